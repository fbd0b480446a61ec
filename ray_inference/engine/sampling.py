"""Next-token choice for a batch whose rows each have their own temperature, top_p and seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, temperature: float, top_p: float, seed: int | None,
               device: torch.device) -> SamplingParams:
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        return cls(temperature, top_p, generator)


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: (batch, vocab). Rows with temperature 0 are greedy; the rest are sampled."""
    # max's indices are argmax's (the first maximum on ties), 4x faster on bf16 CPU logits.
    chosen = logits.max(dim=-1).indices
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return chosen
    index = torch.tensor(rows, device=logits.device)
    temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    probs = torch.softmax(logits.index_select(0, index).float() / temperature[:, None], dim=-1)
    top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    for j, i in enumerate(rows):
        chosen[i] = torch.multinomial(probs[j], 1, generator=params[i].generator)[0]
    return chosen
