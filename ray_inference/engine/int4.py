"""A 4-bit copy of each linear weight for products of a few rows (`engine.int4_max_rows`).

A decode step of one or a few rows computes little and reads every weight once: on a 2-core
Xeon without AMX, SmolLM2's fp32 products took 21 ms of a 33.5 ms one-row step (MKL reading
540 MB at about 25 GB/s). Kept in 4 bits with a scale and an offset per group of 32 inputs,
the same weights are about a sixth of those bytes (5/8 of a byte a weight), and torch's CPU
int4 kernel (`_weight_int4pack_mm_for_cpu`, with bf16 inputs) ran all of
SmolLM2's layers for one row in 6 ms against MKL's 17-19. Its advantage shrinks with every row (0.45x MKL's
time at 4 rows, 0.73x at 8, 1.02x at 16, 2x at 64; against oneDNN's bf16 products on a Xeon
with AMX, 0.48x at one row, 0.89x at 8, 1.57x at 16), so each call picks by its own row count:
at most `max_rows` rows go to the copy, more to the layer as it is (MKL-packed, int8 or
plain). The layers that read one input (q/k/v, gate/up) share one copy and one product.

A Q4_1 GGUF (the packaged SmolLM2) stores each weight as one of 16 levels per group of 32
inputs, from a scale and a minimum per group. transformers dequantizes them to the model's
dtype, and rounding those weights to the same groups finds the same levels: the copy holds the
model's own weights (checked at load: each weight must sit on its level). Its inputs and
outputs are rounded to bf16 (with fp32 inputs the kernel took 7x MKL's time at one row, with
fp16 10x), and so are its scales and offsets.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass

import torch

from ray_inference.engine import linears

log = logging.getLogger(__name__)

GROUP = 32  # inputs per group with their own scale and offset (a Q4_1 block)
_TOP = 15  # levels 0..15
_KERNEL_OFFSET = 8  # the kernel computes (level - 8) * scale + zero
# A weight this close to its level (a fraction of a step) was on it before rounding: exact
# in fp32 for a dequantized Q4_1 GGUF (0.0 for SmolLM2), about 0.015 after rounding to bf16,
# and up to 0.5 for weights that never were 4-bit.
_ON_LEVEL = 0.05
_INNER_K_TILES = 2  # the packed layout's tiling along the inputs (the value measured)
_TINY = torch.finfo(torch.float32).tiny
# Where `engine.int4_max_rows` is auto: the most rows whose products go to the copy, by the
# model's dtype (one SmolLM2 engine, docs/benchmarks.md). fp32, a 2-core Xeon without AMX:
# 1.47x the tokens per second for one client, 1.42x for 4, 1.09x for 16; past 16 rows MKL's
# products are faster. bf16, a 2-core Xeon with AMX: SmolLM2's layers on the copies took
# 0.40-0.48x oneDNN's bf16 time at 1-4 rows, 0.89x at 8, 1.57x at 16; the engine made 1.66x the
# tok/s for one client, 1.36x for 4, 1.20x for 8 and 0.99x for 16 with copies up to 8 rows.
AUTO_MAX_ROWS = {torch.float32: 16, torch.bfloat16: 8}


@dataclass
class FourBit:
    """A weight rounded to 16 levels per group of GROUP inputs (min-max, as Q4_1 rounds)."""

    levels: torch.Tensor  # int32 (out, in), 0..15
    scale: torch.Tensor  # float32 (out, in / GROUP, 1)
    minimum: torch.Tensor  # float32 (out, in / GROUP, 1)
    exact: bool  # every weight was on its level already

    @classmethod
    def of(cls, weight: torch.Tensor) -> FourBit:
        out_features, in_features = weight.shape
        groups = weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)
        minimum = groups.amin(dim=-1, keepdim=True)
        scale = ((groups.amax(dim=-1, keepdim=True) - minimum) / _TOP).clamp(min=_TINY)
        steps = (groups - minimum) / scale
        levels = steps.round()
        exact = bool(((steps - levels).abs() <= _ON_LEVEL).all())
        return cls(levels.clamp_(0, _TOP).to(torch.int32).reshape(out_features, in_features),
                   scale, minimum, exact)

    @classmethod
    def stacked(cls, parts: list[FourBit]) -> FourBit:
        """The weights of `parts` one above the other (their outputs side by side): the
        same levels, since each row and group of 32 is rounded on its own."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([part.levels for part in parts]),
                   torch.cat([part.scale for part in parts]),
                   torch.cat([part.minimum for part in parts]),
                   all(part.exact for part in parts))

    def dequantized(self) -> torch.Tensor:
        """The weight the copy holds, in fp32."""
        out_features, in_features = self.levels.shape
        groups = self.levels.reshape(out_features, in_features // GROUP, GROUP)
        return (groups * self.scale + self.minimum).reshape(out_features, in_features)


class FourBitProduct:
    """The packed 4-bit copy of the layers that read one input, their weights stacked by
    output (q/k/v, gate/up; a layer of its own otherwise), and the product of an input with
    it: the first of them called with an input computes every member's columns in one call of
    the kernel, and each of the others takes its own from that product. On SmolLM2 this is 120
    calls a step instead of 210, the same numbers bit for bit (docs/benchmarks.md)."""

    def __init__(self, four_bit: FourBit, layers: list[torch.nn.Linear]):
        self.in_features = four_bit.levels.shape[1]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(four_bit.levels,
                                                                        _INNER_K_TILES)
        zero = four_bit.minimum + _KERNEL_OFFSET * four_bit.scale
        # (in / GROUP, out, 2): each group's scale and offset, the layout the kernel reads.
        self.scales_and_zeros = (torch.cat([four_bit.scale, zero], dim=-1).transpose(0, 1)
                                 .contiguous().to(torch.bfloat16))
        self.bias = (torch.cat([layer.bias.detach() if layer.bias is not None
                                else layer.weight.new_zeros(layer.out_features)
                                for layer in layers])
                     if any(layer.bias is not None for layer in layers) else None)
        offsets = [0, *itertools.accumulate(layer.out_features for layer in layers)]
        self.spans = list(itertools.pairwise(offsets))
        # (input, its product, the members yet to take their columns of it)
        self._held: tuple[torch.Tensor, torch.Tensor, set[int]] | None = None

    def columns(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member `member`'s columns of the product with `x` (rows, in_features): computed
        when no other member has been called with this very tensor, taken from that product
        otherwise. Each member takes its columns of a product once, then it is let go."""
        if len(self.spans) == 1:  # a layer of its own (o_proj, down_proj): nothing to hold
            return self._multiply(x)
        held = self._held
        if held is None or held[0] is not x or member not in held[2]:
            held = (x, self._multiply(x), set(range(len(self.spans))))
        held[2].discard(member)
        self._held = held if held[2] else None
        start, end = self.spans[member]
        return held[1][:, start:end]

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, GROUP,
            self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            out += self.bias
        return out


class FewRowsInt4Linear(linears.LinearReplacement):
    """A linear layer whose calls of at most `max_rows` rows take its columns of a 4-bit
    product (`product`, where it is member number `member`); larger calls go to the layer
    itself (`many_rows`, which the CPU weight rewrites may replace in turn)."""

    def __init__(self, linear: torch.nn.Linear, max_rows: int, product: FourBitProduct,
                 member: int = 0):
        super().__init__(linear)
        self.many_rows = linear
        self.max_rows = max_rows
        self.product = product
        self.member = member

    @classmethod
    def alone(cls, linear: torch.nn.Linear, max_rows: int) -> FewRowsInt4Linear:
        """The layer with a copy of its own (its weight rounded to 4 bits)."""
        return cls(linear, max_rows, FourBitProduct(FourBit.of(linear.weight), [linear]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not 0 < rows <= self.max_rows:
            return self.many_rows(x)
        self.check_width(x)
        out = self.product.columns(x, self.member)
        return out.reshape(*x.shape[:-1], self.out_features)


def fits(linear: torch.nn.Linear) -> bool:
    """The kernel's shapes: inputs in whole groups, outputs in multiples of 16."""
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


def add_copies(model: torch.nn.Module, max_rows: int, only_exact: bool,
               share_inputs: bool = True) -> int:
    """Give every CPU linear layer of the model but its output layer a 4-bit copy for calls of
    at most `max_rows` rows (`only_exact`: only layers whose weights are 4-bit already), one
    copy for the layers that read one input (`share_inputs`; otherwise one per layer, as
    benchmarks/int4_shared_inputs.py compares); returns how many layers have one. A build
    without the kernel, or whose products disagree, adds none."""
    output = linears.output_layer(model)
    places = linears.cpu_linears(model, lambda linear: linear is not output and fits(linear))
    if not places or not _works():
        return 0
    copies = rounded = 0
    groups = (readers_of_one_input(model, places) if share_inputs
              else [[place] for place in places])
    for group in groups:
        layers = [getattr(parent, name) for parent, name in group]
        four_bits = [FourBit.of(layer.weight) for layer in layers]
        chosen = [i for i, four_bit in enumerate(four_bits) if four_bit.exact or not only_exact]
        if not chosen:
            continue
        product = FourBitProduct(FourBit.stacked([four_bits[i] for i in chosen]),
                                 [layers[i] for i in chosen])
        for member, i in enumerate(chosen):
            parent, name = group[i]
            setattr(parent, name, FewRowsInt4Linear(layers[i], max_rows, product, member))
            rounded += not four_bits[i].exact
        copies += len(chosen)
    if rounded:
        log.warning("engine.int4_max_rows: %d linear layers were not 4-bit; their copies round "
                    "the weights, so products of %d rows or fewer (decode steps of that many "
                    "requests) give slightly different answers", rounded, max_rows)
    return copies


def readers_of_one_input(model: torch.nn.Module,
                         places: list[linears.Place]) -> list[list[linears.Place]]:
    """`places` grouped by the input they read, found in a forward pass of one token: layers
    called one after the other with the very same tensor make a group (a decoder's q/k/v, its
    gate and up projections); every other layer, one called more than once in the pass, and
    every layer of a model that the pass fails on, a group of its own."""
    calls: list[tuple[torch.Tensor | None, linears.Place]] = []

    def recorder(place: linears.Place):
        return lambda module, args: calls.append((args[0] if args else None, place))

    handles = [getattr(parent, name).register_forward_pre_hook(recorder((parent, name)))
               for parent, name in places]
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=False)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        log.warning("engine.int4_max_rows: a forward pass of one token failed (%s); each layer "
                    "gets a 4-bit copy of its own", exc)
        calls = []
    finally:
        for handle in handles:
            handle.remove()
    times_called = Counter(place for _, place in calls)
    groups: list[list[linears.Place]] = []
    previous = None
    for x, place in calls:
        if times_called[place] != 1:
            continue
        if x is not None and x is previous:
            groups[-1].append(place)
        else:
            groups.append([place])
        previous = x
    grouped = {place for group in groups for place in group}
    return groups + [[place] for place in places if place not in grouped]


def _works() -> bool:
    """Whether this build has the CPU int4 kernel and it computes what the levels say."""
    generator = torch.Generator().manual_seed(0)
    plain = torch.nn.Linear(2 * GROUP, 32, bias=False)
    with torch.no_grad():
        plain.weight.normal_(generator=generator)
    x = torch.randn(3, 2 * GROUP, generator=generator)
    try:
        layer = FewRowsInt4Linear.alone(plain, 3)
        with torch.inference_mode():
            out = layer(x)
    except (RuntimeError, AttributeError) as exc:  # AttributeError: no such op in this torch
        log.warning("this build has no CPU int4 kernel (%s); engine.int4_max_rows is ignored",
                    exc)
        return False
    expected = x @ FourBit.of(plain.weight).dequantized().t()
    agrees = torch.allclose(out, expected, rtol=0.02, atol=0.05 * expected.abs().max().item())
    if not agrees:
        log.warning("this build's CPU int4 products disagree; engine.int4_max_rows is ignored")
    return agrees
