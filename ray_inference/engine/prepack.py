"""Linear layers' weights packed once, at load, for the CPU's matrix-product kernels.

Every `F.linear` on a CPU hands the kernel a weight in PyTorch's row-major layout, and the
kernel first rearranges it into the blocked layout it computes on: every layer, every forward
pass. `pack` rearranges each weight once and swaps each `nn.Linear` for a layer that runs the
same kind of kernel on the packed weight:

- bf16: oneDNN's inner product (`_reorder_linear_weight`, the same AMX implementation). SmolLM2
  on the 2-core Xeon with AMX (docs/benchmarks.md): the same logits (its layers have no bias),
  about 10 ms less per forward pass, one row or 64.
- fp32: MKL's packed GEMM (`cblas_sgemm_pack`/`cblas_sgemm_compute`, through torch's
  `_mkl_linear`) or oneDNN's inner product, whichever ran a sample of products faster on this
  CPU at load (`fastest_fp32_kernel`). SmolLM2 on a 2-core Xeon without AMX, MKL: a 64-row decode
  step 0.83x the time of plain `F.linear`, 16 rows 0.77x, one row the same, where oneDNN was
  no faster at 49-64 rows and 1.19x MKL's time at one; on a 2-core AMD EPYC (AVX2), MKL's
  packed products were no faster than plain ones and oneDNN's took 0.70-0.86x MKL's time at
  16-64 rows: the engine made 1.14x the tokens per second at 64 clients. Logits within fp32
  rounding either way.

The packed weight replaces the layer's own (a tied output layer keeps its embedding's), so
the model's memory stays about the same.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ray_inference.engine import linears
from ray_inference.engine.linears import LinearReplacement
from ray_inference.timing import fastest_seconds

log = logging.getLogger(__name__)

# The row count a packed layout is chosen for; any count works. With oneDNN on the Xeon 64
# and 512 ran 1-400 rows alike, and 1 made 64 rows 1.7x slower; MKL packs alike for any count.
BATCH_HINT = 64


class PackedLinear(LinearReplacement):
    """bf16 or fp32 `nn.Linear` whose weight is kept in oneDNN's blocked layout."""

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


# What `engine.prepack_weights` names -> the packed layer.
KERNELS: dict[str, type[LinearReplacement]] = {"mkl": MklPackedLinear, "onednn": PackedLinear}
# Weight dtype -> the kernels that can hold it, the default first (bf16: oneDNN's AMX path;
# fp32: MKL's, where the Xeons measured it the faster at one row).
_CANDIDATES = {torch.bfloat16: ("onednn",), torch.float32: ("mkl", "onednn")}
# Where fp32 has both: the row count and layers timed at load (a 64-client batch's decode step
# averages about 49 rows, and with 4-bit copies the plain kernels run only past 16), and how
# much faster than MKL's oneDNN must be to be taken (on the Xeon without AMX its steps took
# 0.96-0.98x MKL's time at 49-64 rows and 1.19x at one; on the EPYC this sample's ratio was
# 0.65-0.86 on two threads, 0.88-1.02 on one).
_SAMPLE_ROWS = 48
_SAMPLE_LAYERS = 8
_TAKE_BELOW = 0.9


def _available(kernel: str, dtype: torch.dtype) -> bool:
    if kernel == "mkl":
        return dtype == torch.float32 and torch.backends.mkl.is_available()
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16
                                      and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def kernels(dtype: torch.dtype) -> list[str]:
    """The kernels this CPU build can pack `dtype` weights for, the default first."""
    return [kernel for kernel in _CANDIDATES.get(dtype, ()) if _available(kernel, dtype)]


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU whose oneDNN has bf16 kernels, fp32 on a CPU build with MKL or oneDNN."""
    return device.type == "cpu" and bool(kernels(dtype))


def pack(model: torch.nn.Module, kernel: str = "auto") -> int:
    """Swap every bf16 or fp32 `nn.Linear` of a CPU model for its packed twin; returns how
    many. `kernel`: "mkl" or "onednn" where the build has it for the weights' dtype, "auto"
    for the one measured the faster here (`fastest_fp32_kernel`). Layers packed before stay as
    they are, so packing a model twice packs nothing more."""
    places = linears.cpu_linears(model, lambda linear: bool(kernels(linear.weight.dtype)))
    if not places:
        return 0
    first = getattr(*places[0])
    dtype = first.weight.dtype
    places = [place for place in places if getattr(*place).weight.dtype == dtype]
    choices = kernels(dtype)
    if kernel not in ("auto", *choices):
        log.warning("engine.prepack_weights: %s cannot pack %s weights in this build; "
                    "packing them for %s", kernel, dtype, choices[0])
        kernel = "auto"
    if kernel == "auto":
        kernel = (_measured_fp32_kernel(linears.sample_width(first.in_features),
                                        torch.get_num_threads())
                  if len(choices) > 1 else choices[0])
    kind = KERNELS[kernel]
    if not _agrees(first, kind):
        return 0
    # After each layer: MKL's packed buffer is about 4x the weight's bytes (3,490,017 floats
    # for a 1536x576 weight), and on fresh memory 20 of them took 3.6 MB of RSS each, so only
    # the packed bytes are written (inferred from RSS, not traced); on pages a freed weight
    # left resident the rest would count too. A SmolLM2 process in fp32: 884 MiB RSS before
    # packing, 1,011 after (the tied output layer's packed copy is 108 MiB); 416 MiB more, not
    # 127, with one trim at the end. In bf16: 628 before, 694 after (in the eighth session,
    # without trimming: 663 before, 908 after).
    return linears.replace(places, kind, trim_each=True)


def kernel_of(model: torch.nn.Module) -> str | None:
    """Which kernel the model's packed layers run ("mkl", "onednn"), or None."""
    names = {kind: name for name, kind in KERNELS.items()}
    return next((names[type(module)] for module in model.modules() if type(module) in names),
                None)


@functools.cache
def _measured_fp32_kernel(width: int, threads: int) -> str:
    """The pick, once per process for a width and thread count: a benchmark or test that
    makes many engines measures once."""
    return fastest_fp32_kernel(width)[0]


def fastest_fp32_kernel(width: int) -> tuple[str, dict[str, float]]:
    """MKL or oneDNN, whichever multiplied a sample faster on this CPU (oneDNN only where it
    took under `_TAKE_BELOW` of MKL's time), and each one's time in seconds: `_SAMPLE_ROWS`
    rows through `_SAMPLE_LAYERS` fresh (2 width, width) fp32 layers, the fastest of several
    interleaved rounds (on a busy machine, the one other processes disturbed least), on the
    threads the engine runs."""
    plain, x = linears.timing_sample(width, _SAMPLE_LAYERS, _SAMPLE_ROWS)
    width = x.shape[1]

    def products(layers: list[LinearReplacement]):
        return lambda: [layer(x) for layer in layers]

    try:
        with torch.inference_mode():
            seconds = fastest_seconds({name: products([KERNELS[name](layer) for layer in plain])
                                       for name in ("mkl", "onednn")})
    except RuntimeError as exc:
        log.warning("timing MKL's and oneDNN's fp32 products failed (%s); packing for MKL", exc)
        return "mkl", {}
    chosen = "onednn" if seconds["onednn"] < _TAKE_BELOW * seconds["mkl"] else "mkl"
    log.info("fp32 weights packed for %s: %d rows through %d layers of %d inputs took %.2f ms "
             "with MKL, %.2f ms with oneDNN", chosen, _SAMPLE_ROWS, _SAMPLE_LAYERS, width,
             seconds["mkl"] * 1000, seconds["onednn"] * 1000)
    return chosen, seconds


def _agrees(linear: torch.nn.Linear, kind: type[LinearReplacement]) -> bool:
    """Whether a packed copy of `linear` computes what it does, for one row, a few, and more
    than it was packed for: bit for bit in bf16 without a bias (the same AMX implementation
    runs), within rounding otherwise (bf16 with a bias, one try with random weights: 0.125
    apart at most). A build that cannot pack, or whose packed products disagree, leaves the
    model as it is."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        try:
            packed = kind(linear)
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
