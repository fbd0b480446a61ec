"""A lean decode step (ray_inference/engine/lean.py) against the model's own forward pass.

Side by side in one process, on SmolLM2 (the packaged model, packed as the engine packs it):
a packed decode step of 1, 8 and 64 rows over 111 columns of random K/V, through LeanDecoder
and through the model's forward, rounds alternating which goes first. Checks that the logits
are equal, then prints the median milliseconds of each and their ratio.

    .venv/bin/python benchmarks/lean_step.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import functools

import torch
from step_timing import RandomStep, alternating_medians

from ray_inference.config import EngineConfig
from ray_inference.engine import create_engine, lean, packing
from ray_inference.models import loader, registry

CALLS = 5


def step(model, decoder, random: RandomStep) -> torch.Tensor:
    if decoder is not None:
        return decoder.forward(random.ids, random.positions, random.cache(), random.plan)
    plan = random.plan
    return model(input_ids=random.ids[None], attention_mask=plan.mask[:1, :, :, :1],
                 position_ids=random.positions[None], use_cache=True, cache=random.cache(),
                 logits_to_keep=plan.keep(random.ids.device), **{packing.PLAN: plan}).logits[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    loaded = loader.load(registry.resolve("smollm2"))
    engine = create_engine(loaded, EngineConfig(max_batch_size=64))  # packs the weights
    model = loaded.model
    ways = {"lean": lean.LeanDecoder(model), "model forward": None}
    for rows in (1, 8, 64):
        random = RandomStep.make(model, rows)
        with torch.inference_mode():
            outputs = [step(model, d, random) for d in ways.values()]
            assert torch.equal(*outputs), "the lean step's logits differ from the model's"
            medians = alternating_medians(
                {name: functools.partial(step, model, d, random) for name, d in ways.items()},
                args.rounds, CALLS)
        lean_ms, model_ms = medians.values()
        print(f"{rows:2d} rows: lean {lean_ms:6.1f} ms, model forward {model_ms:6.1f} ms, "
              f"{lean_ms / model_ms:.2f}x (logits equal)")
    engine.shutdown()


if __name__ == "__main__":
    main()
