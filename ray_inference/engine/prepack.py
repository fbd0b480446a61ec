"""Linear layers' weights packed once, at load, for the CPU's matrix-product kernels.

Every `F.linear` on a CPU hands the kernel a weight in PyTorch's row-major layout, and the
kernel first rearranges it into the blocked layout it computes on: every layer, every forward
pass. `pack` rearranges each weight once and swaps each `nn.Linear` for a layer that runs the
same kind of kernel on the packed weight:

- bf16: oneDNN's inner product (`_reorder_linear_weight`, the same AMX implementation). SmolLM2
  on the 2-core Xeon with AMX (docs/benchmarks.md): the same logits (its layers have no bias),
  about 10 ms less per forward pass, one row or 64.
- fp32: MKL's packed GEMM (`cblas_sgemm_pack`/`cblas_sgemm_compute`, through torch's
  `_mkl_linear`). SmolLM2 on a 2-core Xeon without AMX: a 64-row decode step 0.83x the time,
  16 rows 0.77x, one row the same; logits within fp32 rounding.

The packed weight replaces the layer's own (a tied output layer keeps its embedding's), so
the model's memory stays about the same.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ray_inference.engine import linears
from ray_inference.engine.linears import LinearReplacement

log = logging.getLogger(__name__)

# The row count a packed layout is chosen for; any count works. With oneDNN on the Xeon 64
# and 512 ran 1-400 rows alike, and 1 made 64 rows 1.7x slower; MKL packs alike for any count.
BATCH_HINT = 64


class PackedLinear(LinearReplacement):
    """bf16 `nn.Linear` whose weight is kept in oneDNN's blocked layout."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class MklPackedLinear(LinearReplacement):
    """fp32 `nn.Linear` whose weight is kept in MKL's packed GEMM layout.

    torch's `_mkl_linear` takes the packed path only when the input's row count equals the
    count it is told the weight was packed for, and falls back to the plain weight otherwise.
    MKL's packed weight has the same size whatever count it is packed for, and one packed for
    64 rows gave the same products as one packed for each count at 3, 7, 49, 100 and 513 rows
    (at one row, products within fp32 rounding), so each call passes its own row count and
    always runs packed (`pack` checks 1, 3 and 65 rows against the plain layer). The plain
    weight is then never read, only its shape: a stand-in of that shape over one element
    takes its place."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach()
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, BATCH_HINT)
        self.shape_only = weight.new_zeros(()).expand(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)  # MKL would read past a narrower input without a word
        rows = x.numel() // self.in_features
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_only, self.bias, rows)


# Weight dtype -> the packed layer for it.
_PACKED = {torch.bfloat16: PackedLinear, torch.float32: MklPackedLinear}


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU whose oneDNN has bf16 kernels, fp32 on a CPU build with MKL."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32 and torch.backends.mkl.is_available()


def pack(model: torch.nn.Module) -> int:
    """Swap every bf16 or fp32 `nn.Linear` of a CPU model for its packed twin; returns how
    many. Layers packed before stay as they are, so packing a model twice packs nothing more."""
    places = linears.cpu_linears(model, lambda linear: linear.weight.dtype in _PACKED)
    if not places or not _agrees(getattr(*places[0])):
        return 0
    # After each layer: MKL's packed buffer is about 4x the weight's bytes (3,490,017 floats
    # for a 1536x576 weight), and on fresh memory 20 of them took 3.6 MB of RSS each, so only
    # the packed bytes are written (inferred from RSS, not traced); on pages a freed weight
    # left resident the rest would count too. A SmolLM2 process in fp32: 884 MiB RSS before
    # packing, 1,011 after (the tied output layer's packed copy is 108 MiB); 416 MiB more, not
    # 127, with one trim at the end. In bf16: 628 before, 694 after (in the eighth session,
    # without trimming: 663 before, 908 after).
    return linears.replace(places, lambda linear: _PACKED[linear.weight.dtype](linear),
                           trim_each=True)


def _agrees(linear: torch.nn.Linear) -> bool:
    """Whether a packed copy of `linear` computes what it does, for one row, a few, and more
    than it was packed for: bit for bit in bf16 without a bias (the same AMX implementation
    runs), within rounding otherwise (bf16 with a bias, one try with random weights: 0.125
    apart at most). A build that cannot pack, or whose packed products disagree, leaves the
    model as it is."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        try:
            packed = _PACKED[linear.weight.dtype](linear)
            for rows in (1, 3, BATCH_HINT + 1):
                x = torch.randn(rows, linear.in_features, generator=generator,
                                dtype=linear.weight.dtype)
                if not torch.allclose(packed(x), F.linear(x, linear.weight, linear.bias),
                                      rtol=0.02, atol=0.02):
                    log.warning("packed linear weights disagree with the model's own; "
                                "leaving them as they are")
                    return False
        except RuntimeError as exc:
            log.warning("this CPU build cannot pack linear weights (%s); leaving them as they "
                        "are", exc)
            return False
    return True
