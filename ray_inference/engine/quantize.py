"""Linear layers in int8 on CPU workers (`engine.quantize: int8`): weights once, activations per
step.

Each weight is rounded to int8 once, at load, with one scale per output channel; each input is
rounded to int8 on the way in with one scale per row (per token), so that a token whose
activations run large (SmolLM2 has tokens with values in the tens of thousands in its residual
stream) does not coarsen the others' rounding, as one scale per tensor does. The product runs
on the CPU's int8 dot-product instructions (`torch._int_mm`: oneDNN, VNNI on AVX-512 Xeons) into
exact int32 sums, which are scaled back by the row's and the channel's scales. This is the
scheme vLLM calls W8A8 with dynamic per-token activation scales.

The model's output layer stays as it is (the logits are what sampling reads; quantization
recipes such as llm-compressor's leave it out too), and so do embeddings and norms.

SmolLM2 on a 2-core Xeon without AMX (docs/benchmarks.md): perplexity 40.43 against 39.40 in
fp32 on 6,144 tokens of this project's docs, and the engine made more tokens per second at 64
clients. Off by default: it changes the model's answers (greedy answers part from fp32's after
a few tokens, where bf16's part after tens).

Only where int8 is faster than the model's own products: on a 2-core AMD EPYC with AVX2 and
no int8 dot-product instructions (no VNNI), `torch._int_mm` ran no oneDNN primitive
(ONEDNN_VERBOSE) and took 25-90x fp32's time per product, and the engine made 10.4 tok/s at
64 clients against 117.9 in fp32; on a 2-core Xeon with AMX, whose bf16 products are faster
still, int8 made a bf16 engine 0.75x as fast (404 against 540 tok/s at 64 clients). So
`quantize` first times int8 layers against plain products in the model's dtype on this CPU,
and keeps the model as it is, with a warning that gives both times, where int8 was not faster.
"""

from __future__ import annotations

import functools
import logging

import torch

from ray_inference.engine import linears
from ray_inference.engine.base import short_dtype
from ray_inference.timing import fastest_seconds, one_thread

log = logging.getLogger(__name__)

# Symmetric int8: -127..127, so that negating a value never overflows.
_LIMIT = 127
# The smallest scale: an all-zero row or weight channel divides by it, not by zero.
_TINY = torch.finfo(torch.float32).tiny
# The speed check at load: rows (a 64-client decode step averages about 49) through fresh
# (2 width, width) layers, int8 against plain products in the model's dtype, on one thread
# (`timing.one_thread`); int8 is kept where it took less time. Measured: fp32 with VNNI, a
# SmolLM2 step's int8 products and input rounding took about 0.64x MKL-packed fp32 products (a
# 2-core Xeon without AMX), which took 0.52-0.78x plain ones; on the Xeon with AMX this sample
# took 0.39-0.81x plain fp32 and 1.07-1.74x plain bf16 on one thread, with or without a second
# process timing beside it (on two threads beside a second process: fp32 up to 6.3x, bf16 up to 12x);
# without VNNI, 15-22x fp32 (the AMD EPYC, on two threads).
_SAMPLE_ROWS = 48
_SAMPLE_LAYERS = 2


class Int8Linear(linears.LinearReplacement):
    """An `nn.Linear` whose weight is int8 with a scale per output channel and whose input is
    rounded to int8 with a scale per row."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=_TINY) / _LIMIT
        # (in, out): the layout torch._int_mm multiplies by.
        self.weight_int8 = torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous()
        self.weight_scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)  # a multiple of the width would reshape into rows without a word
        rows = x.reshape(-1, self.in_features)
        scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_(min=_TINY).mul_(1 / _LIMIT)
        rows_int8 = (rows / scale).round_().to(torch.int8)
        out = torch._int_mm(rows_int8, self.weight_int8).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def supported(device: torch.device) -> bool:
    """CPU workers only: on a GPU `torch._int_mm` wants more than 16 rows in multiples of 8, and
    a decode step has any number."""
    return device.type == "cpu"


def quantize(model: torch.nn.Module, if_fast: bool = True) -> int:
    """Swap every `nn.Linear` of a CPU model but its output layer for an `Int8Linear`; returns
    how many. A build whose int8 product fails or disagrees leaves the model as it is, and so
    does one whose int8 products are slower here than the model's own (`if_fast`; tests of
    the layers turn it off)."""
    output = linears.output_layer(model)
    places = linears.cpu_linears(model, lambda linear: linear is not output)
    if not places or not _works():
        return 0
    first = getattr(*places[0])
    if if_fast and not fast(first.in_features, first.weight.dtype):
        return 0
    # One trim at the end: per layer it took 0.7 s against 0.4 for SmolLM2, for the same RSS.
    return linears.replace(places, Int8Linear)


def fast(width: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether int8 products beat a `dtype` model's own on this CPU, measured once per process
    for a width and dtype (`int8_against_unquantized`); where they do not, it says so in a
    warning."""
    return _measured_fast(linears.sample_width(width), dtype)


@functools.cache
def _measured_fast(width: int, dtype: torch.dtype) -> bool:
    with one_thread():
        seconds = int8_against_unquantized(width, dtype)
    ratio = seconds["int8"] / seconds["unquantized"]
    if ratio < 1:
        return True
    log.warning("engine.quantize: int8 declined: on this CPU %d rows through int8 layers took "
                "%.2fx %s's time (%.3f against %.3f ms; int8 pays where the CPU has int8 "
                "dot-product instructions such as VNNI and the model's own products are slower, "
                "as fp32's are, not bf16's on AMX); the model keeps its weights", _SAMPLE_ROWS,
                ratio, short_dtype(dtype), seconds["int8"] * 1000,
                seconds["unquantized"] * 1000)
    return False


def int8_against_unquantized(width: int, dtype: torch.dtype) -> dict[str, float]:
    """Seconds for `_SAMPLE_ROWS` rows through `_SAMPLE_LAYERS` fresh (2 width, width) layers,
    as `Int8Linear`s ("int8", their inputs' rounding included) and as plain products in
    `dtype` ("unquantized"): the fastest of three interleaved rounds, on torch's threads as
    they are."""
    plain, x = linears.timing_sample(width, _SAMPLE_LAYERS, _SAMPLE_ROWS)
    plain, x = [layer.to(dtype) for layer in plain], x.to(dtype)
    int8 = [Int8Linear(layer) for layer in plain]
    with torch.inference_mode():
        seconds = fastest_seconds({"int8": lambda: [layer(x) for layer in int8],
                                   "unquantized": lambda: [layer(x) for layer in plain]},
                                  rounds=3)
    # Three decimals: the tests tell the decision from these times.
    log.info("int8 products: %d rows through %d layers of %d inputs took %.3f ms, %s's "
             "%.3f ms", _SAMPLE_ROWS, _SAMPLE_LAYERS, x.shape[1], seconds["int8"] * 1000,
             short_dtype(dtype), seconds["unquantized"] * 1000)
    return seconds


def _works() -> bool:
    """Whether this build multiplies int8 exactly (a product small enough to check in int64)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-_LIMIT, _LIMIT + 1, (3, 72), dtype=torch.int8, generator=generator)
    b = torch.randint(-_LIMIT, _LIMIT + 1, (72, 40), dtype=torch.int8, generator=generator)
    try:
        exact = torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
    except RuntimeError as exc:
        log.warning("this build cannot multiply int8 on the CPU (%s); the model stays as it "
                    "is", exc)
        return False
    if not exact:
        log.warning("this build's int8 products are not exact; the model stays as it is")
    return exact

