"""Next-token choice for a batch whose rows each have their own temperature, top_p and seed.

A sampled row takes one uniform number per token, drawn on the host (from its request's own
generator when it has a seed), and inverts its distribution's cumulative sum at it.
torch.multinomial costs about 1.2 ms per 49k-token row on a CPU (it draws an exponential
number per token), a whole 64-row step's worth at 64 rows; the cumulative sum and one search
per row cost about a tenth of that. On a CPU top_p looks for each row's nucleus among its most
likely tokens first and sorts the whole vocabulary only for rows whose nucleus reaches past
them; on a GPU it sorts every row, since choosing rows would make the host wait for the
device. Nothing here waits for a GPU: the engine launches the next step while this one's
tokens are on their way (docs/engine.md)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# Uniform numbers are drawn on the host, from Python's generator: a torch generator per seeded
# row on a GPU would cost a kernel launch per row and step (2 ms at 128 rows on an H200).
_unseeded = random.Random()  # sampling, not secrets

# How many of a row's most likely tokens top_p looks among, in turn, before sorting the whole
# row (CPU): SmolLM2's nucleus at temperature 1 and top_p 0.95 held more than 256 tokens in
# 18% of its rows, more than 1,024 in 3.5% (docs/engine.md).
NUCLEUS_WINDOWS = (256, 4096)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    rng: random.Random | None = None  # the request's own draws when it has a seed

    @classmethod
    def create(cls, temperature: float, top_p: float, seed: int | None) -> SamplingParams:
        rng = random.Random(seed) if seed is not None and temperature > 0 else None
        return cls(temperature, top_p, rng)

    def uniform(self) -> float:
        """The next number in [0, 1) this row samples at."""
        return (self.rng or _unseeded).random()


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: (batch, vocab). Rows with temperature 0 are greedy; the rest are sampled."""
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return _greedy(logits)
    device = logits.device
    every_row = len(rows) == len(params)
    index = None if every_row else _on(device, rows)
    temperature = _on(device, [params[i].temperature for i in rows])
    picked = logits if every_row else logits.index_select(0, index)
    probs = torch.softmax(picked.float() / temperature[:, None], dim=-1)
    uniforms = _on(device, [params[i].uniform() for i in rows], torch.float64)
    # Rows with top_p 1 draw from the whole distribution: they never pay for a nucleus (a
    # row left to the full sort costs about 1.8 ms on a CPU).
    nucleus = [j for j, i in enumerate(rows) if params[i].top_p < 1.0]
    if len(nucleus) == len(rows):
        picks = _nucleus_draw(probs, _on(device, [params[i].top_p for i in rows]), uniforms)
    else:
        picks = _draw(probs, uniforms)
        if nucleus:
            some = _on(device, nucleus)
            top_p = _on(device, [params[rows[j]].top_p for j in nucleus])
            picks.index_copy_(0, some, _nucleus_draw(probs.index_select(0, some), top_p,
                                                     uniforms.index_select(0, some)))
    # The argmax only when some rows are greedy (2 ms at 64 rows on a CPU).
    return picks if every_row else _greedy(logits).index_copy_(0, index, picks)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    # max's indices are argmax's (the first maximum on ties), 4x faster on bf16 CPU logits.
    return logits.max(dim=-1).indices


def _on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A short list as a tensor on `device`; on a GPU copied from pinned memory without
    waiting (a plain copy would wait for every step queued before it)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the token at which the cumulative sum of `weights` (not normalized, each row
    with some weight) passes its uniform's share of the row's total."""
    cumulative = weights.double().cumsum(dim=-1)
    total = cumulative[:, -1:]
    picks = torch.searchsorted(cumulative, uniforms[:, None] * total, right=True)
    # u * total can round up to the total; the last token with weight is the furthest pick.
    last = torch.searchsorted(cumulative, total.contiguous())
    # NaN weights (a broken model's logits) still give a token of the vocabulary.
    return torch.minimum(picks, last).clamp_(max=weights.shape[-1] - 1).squeeze(1)


def _nucleus_draw(probs: torch.Tensor, top_p: torch.Tensor,
                  uniforms: torch.Tensor) -> torch.Tensor:
    """Sample each row among its most likely tokens whose mass before each reaches no more
    than top_p (the first token always stays). On a CPU, among each window of most likely
    tokens in turn for the rows whose nucleus it holds; then the whole sorted vocabulary."""
    picks = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    rows = torch.arange(len(probs), device=probs.device)
    windows = NUCLEUS_WINDOWS if probs.device.type == "cpu" else ()
    for window in windows:
        if window >= probs.shape[-1]:
            break
        ranked, order = probs.topk(window, dim=-1)
        held = ranked.sum(dim=-1) >= top_p
        inside = held.nonzero().squeeze(1)
        picks[rows[inside]] = _nucleus_pick(ranked[inside], order[inside], top_p[inside],
                                            uniforms[inside])
        wide = (~held).nonzero().squeeze(1)
        if not len(wide):
            return picks
        probs, top_p, uniforms, rows = (t.index_select(0, wide)
                                        for t in (probs, top_p, uniforms, rows))
    ranked, order = probs.sort(dim=-1, descending=True)
    picks[rows] = _nucleus_pick(ranked, order, top_p, uniforms)
    return picks


def _nucleus_pick(ranked: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor,
                  uniforms: torch.Tensor) -> torch.Tensor:
    """Draw among probabilities sorted high to low (`order`: their tokens), each zeroed once
    the mass before it reaches top_p."""
    before = ranked.cumsum(dim=-1) - ranked
    inside = ranked.masked_fill(before >= top_p[:, None], 0.0)
    return order.gather(-1, _draw(inside, uniforms)[:, None]).squeeze(1)
