"""What the *_step.py benchmarks share: a packed decode step of SmolLM2 over random K/V, and
timing variants of it side by side in one process."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ray_inference.engine import packing
from ray_inference.engine.kv import SlotKV
from ray_inference.timing import seconds_per_round

FIRST, COLUMN = 10, 120  # the step attends over columns [FIRST, COLUMN]: 111 of them


@dataclass
class RandomStep:
    """A decode step of `rows` rows at column COLUMN over K/V of random values."""

    kv: SlotKV
    plan: packing.PackedPlan
    ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def make(cls, model: torch.nn.Module, rows: int, huge_pages: bool = False) -> RandomStep:
        config, dtype = model.config, model.dtype
        head_dim = model.model.layers[0].self_attn.head_dim
        kv = SlotKV(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype,
                    torch.device("cpu"), 64, 256, 2048, huge_pages)
        for tensor in kv.keys + kv.values:
            tensor.normal_()
        kv.valid[:rows, FIRST:COLUMN + 1] = True
        plan = packing.PackedPlan(rows, FIRST, COLUMN,
                                  kv.attention_mask(rows, FIRST, COLUMN + 1, dtype), [])
        return cls(kv, plan, torch.randint(0, config.vocab_size, (rows,)),
                   torch.full((rows,), COLUMN - FIRST))

    def cache(self):
        return packing.packed_cache(self.kv.keys, self.kv.values, self.plan)


def alternating_medians(runs: dict[str, Callable[[], object]], rounds: int,
                        calls: int) -> dict[str, float]:
    """Each run's median milliseconds a call over `rounds` rounds of `calls` calls, the runs'
    order flipping every round (ray_inference.timing.seconds_per_round)."""
    return {name: statistics.median(times) * 1000
            for name, times in seconds_per_round(runs, rounds, calls).items()}
