"""Decode attention on a CPU: query heads folded per K/V head against SDPA's enable_gqa.

Side by side in one process, on SmolLM2 (the packaged model, packed as the engine packs it,
bf16 where the CPU has AVX512-BF16/AMX, else fp32): a lean decode step (engine/lean.py) of
1, 16 and 64 rows over 111 columns of random K/V, its attention (packing.decode_attention)
once through `grouped_decode_attention` and once through `folded_decode_attention`, rounds
alternating which goes first. Prints the median milliseconds of each step and their ratio,
and the largest difference between the two attentions' outputs on the step's first layer
(rounding: the step's random K/V then amplify it through the layers, so its logits are not
compared).

    .venv/bin/python benchmarks/decode_attention_step.py [--rounds 16] [--dtype float32]
"""

from __future__ import annotations

import argparse
import functools

import torch
from step_timing import RandomStep, alternating_medians

from ray_inference.config import EngineConfig
from ray_inference.engine import create_engine, lean, packing
from ray_inference.models import loader, registry

CALLS = 3
WAYS = {"enable_gqa": packing.grouped_decode_attention, "folded": packing.folded_decode_attention}


def step(decoder: lean.LeanDecoder, random: RandomStep, attention) -> torch.Tensor:
    packing.decode_attention = attention  # packed_attention looks it up at every call
    return decoder.forward(random.ids, random.positions, random.cache(), random.plan)


def first_layer_difference(decoder: lean.LeanDecoder, random: RandomStep) -> float:
    seen: list[float] = []

    def both(query, key, value, mask, scale):
        ours, theirs = (way(query, key, value, mask, scale) for way in WAYS.values())
        seen.append(float((ours.float() - theirs.float()).abs().max()))
        return ours

    step(decoder, random, both)
    return seen[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    loaded = loader.load(registry.resolve("smollm2"), args.dtype)
    engine = create_engine(loaded, EngineConfig(max_batch_size=64))  # packs the weights
    decoder = lean.LeanDecoder(loaded.model)
    shipped = packing.decode_attention
    print(f"SmolLM2 in {loaded.dtype}, K/V in {loaded.dtype}", flush=True)
    for rows in (1, 16, 64):
        random = RandomStep.make(loaded.model, rows)
        with torch.inference_mode():
            difference = first_layer_difference(decoder, random)
            medians = alternating_medians(
                {name: functools.partial(step, decoder, random, way) for name, way in WAYS.items()},
                args.rounds, CALLS)
        grouped_ms, folded_ms = medians.values()
        print(f"{rows:2d} rows: enable_gqa {grouped_ms:6.1f} ms, folded {folded_ms:6.1f} ms, "
              f"{folded_ms / grouped_ms:.3f}x (first layer's outputs within {difference:.1e})",
              flush=True)
    packing.decode_attention = shipped
    engine.shutdown()


if __name__ == "__main__":
    main()
