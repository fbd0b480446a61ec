"""Prefills and padded batches on CUDA leave cuDNN's attention out (ray_inference/engine/sdpa.py
says why)."""

import torch

from ray_inference.engine import sdpa


def test_passes_in_new_shapes_on_cuda_leave_cudnn_out_and_restore_the_choice_after():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa.new_shape_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_other_devices_keep_pytorchs_choice():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa.new_shape_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
