"""Which SDPA kernels a prefill may use.

On an H100, PyTorch picked cuDNN's attention for a prefill over a cached prefix (a masked
pass whose query is shorter than its keys), and a prefill of the SmolLM2 shape spent 1.08 s
of CPU in its 30 calls, 36 ms each, for 0.28 ms on the GPU (docs/benchmarks.md): cuDNN
plans each new shape, and prefills come in ever new shapes (how many prompts, how long).
Flash and memory-efficient attention need no plans, so prefills leave cuDNN out on CUDA.
Decode steps keep PyTorch's choice: their shapes are a few graph buckets, and with cuDNN
left out of them too (grouped-query SDPA, `enable_gqa`) the Llama-1.24B shape made a quarter
of the tokens with graphs and 0.65x without.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                         SDPBackend.MATH]


def prefill_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """A context for one prefill pass: on CUDA every SDPA kernel but cuDNN's; elsewhere
    PyTorch's own choice."""
    return sdpa_kernel(CUDA_PREFILL_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()
