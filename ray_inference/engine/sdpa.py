"""Which SDPA kernels a pass in a new shape may use: prefills, and padded batches (T5, BERT).

On an H100, PyTorch picked cuDNN's attention for a prefill over a cached prefix (a masked
pass whose query is shorter than its keys), and a prefill of the SmolLM2 shape spent 1.08 s
of CPU in its 30 calls, 36 ms each, for 0.28 ms on the GPU (docs/benchmarks.md): cuDNN
plans each new shape, and prefills come in ever new shapes (how many prompts, how long). On
an H200 it made 30 padded batches of new shapes take 5.5-34x as long for a DistilBERT shape
and 1.4-1.5x for T5-small's. Flash and memory-efficient attention need no plans, so these passes
leave cuDNN out on CUDA.
Decode steps keep PyTorch's choice: their shapes are a few graph buckets, and with cuDNN
left out of them too (grouped-query SDPA, `enable_gqa`) the Llama-1.24B shape made a quarter
of the tokens with graphs and 0.65x without.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_NEW_SHAPE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                           SDPBackend.MATH]


def new_shape_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """A context for one pass in a shape that may be new (a prefill, a padded batch): on CUDA
    every SDPA kernel but cuDNN's; elsewhere PyTorch's own choice."""
    return sdpa_kernel(CUDA_NEW_SHAPE_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()
