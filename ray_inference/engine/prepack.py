"""Linear layers' weights reordered once, at load, for oneDNN's bf16 kernels on CPUs.

In bf16 on a CPU, `F.linear` hands oneDNN's matmul a weight in PyTorch's row-major layout, and
its AMX kernel works on a blocked layout, so every product rearranges the weight: every layer,
every forward pass. `pack` reorders each weight once (oneDNN's `_reorder_linear_weight`) and
swaps each `nn.Linear` for a `PackedLinear` that runs oneDNN's inner product on the blocked
weight (the same AMX implementation). SmolLM2 on the 2-core Xeon (docs/benchmarks.md): the
same logits (its layers have no bias), about 10 ms less per forward pass, one row or 64.

The packed weight replaces the layer's own (a tied output layer keeps its embedding's), so
the model's memory stays about the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The row count oneDNN's packed layout is chosen for; any count works. On the Xeon 64 and 512
# ran 1-400 rows alike, and 1 made 64 rows 1.7x slower.
BATCH_HINT = 64


class PackedLinear(torch.nn.Module):
    """`nn.Linear` whose weight is kept in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU whose oneDNN has bf16 kernels."""
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(model: torch.nn.Module) -> int:
    """Swap every bf16 `nn.Linear` of a CPU model for a `PackedLinear`; returns how many.
    Layers packed before stay as they are, so packing a model twice packs nothing more."""
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children()
              if isinstance(child, torch.nn.Linear) and child.weight.dtype == torch.bfloat16
              and child.weight.device.type == "cpu"]
    if not places or not _agrees(getattr(*places[0])):
        return 0
    for parent, name in places:  # nothing else holds the replaced layers afterwards
        setattr(parent, name, PackedLinear(getattr(parent, name)))
    _return_freed_memory()
    return len(places)


def _return_freed_memory() -> None:
    """glibc keeps the replaced weights' freed pages; hand them back to the system (a
    SmolLM2 process: 663 MiB RSS before packing, 693 after, 908 without this)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _agrees(linear: torch.nn.Linear) -> bool:
    """Whether a packed copy of `linear` computes what it does: bit for bit without a bias
    (the same AMX implementation runs), within bf16 rounding with one (one try with random
    weights and a bias: 0.125 apart at most). A oneDNN build that disagrees leaves the model
    as it is."""
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0),
                    dtype=linear.weight.dtype)
    with torch.inference_mode():
        try:
            packed = PackedLinear(linear)(x)
        except RuntimeError as exc:
            log.warning("oneDNN cannot pack linear weights (%s); leaving them as they are", exc)
            return False
        if torch.allclose(packed, F.linear(x, linear.weight, linear.bias), rtol=0.02, atol=0.02):
            return True
    log.warning("packed linear weights disagree with the model's own; leaving them as they are")
    return False
