"""A lean decode step (ray_inference/engine/lean.py) against the model's own forward pass.

Side by side in one process, on SmolLM2 (the packaged model, packed as the engine packs it):
a packed decode step of 1, 8 and 64 rows over 111 columns of random K/V, through LeanDecoder
and through the model's forward, rounds alternating which goes first. Checks that the logits
are equal, then prints the median milliseconds of each and their ratio.

    .venv/bin/python benchmarks/lean_step.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ray_inference.config import EngineConfig
from ray_inference.engine import create_engine, lean, packing
from ray_inference.engine.kv import SlotKV
from ray_inference.models import loader, registry

FIRST, COLUMN, CALLS = 10, 120, 5


def step(model, decoder, kv: SlotKV, plan, ids, positions) -> torch.Tensor:
    cache = packing.packed_cache(kv.keys, kv.values, plan)
    if decoder is not None:
        return decoder.forward(ids, positions, cache, plan)
    return model(input_ids=ids[None], attention_mask=plan.mask[:1, :, :, :1],
                 position_ids=positions[None], use_cache=True, cache=cache,
                 logits_to_keep=plan.keep(ids.device), **{packing.PLAN: plan}).logits[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    loaded = loader.load(registry.resolve("smollm2"))
    engine = create_engine(loaded, EngineConfig(max_batch_size=64))  # packs the weights
    model, config, dtype = loaded.model, loaded.model.config, loaded.dtype
    ways = {"lean": lean.LeanDecoder(model), "model forward": None}
    head_dim = model.model.layers[0].self_attn.head_dim
    for rows in (1, 8, 64):
        kv = SlotKV(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype,
                    torch.device("cpu"), 64, 256, 2048)
        for tensor in kv.keys + kv.values:
            tensor.normal_()
        kv.valid[:rows, FIRST:COLUMN + 1] = True
        plan = packing.PackedPlan(rows, FIRST, COLUMN,
                                  kv.attention_mask(rows, FIRST, COLUMN + 1, dtype), [])
        ids = torch.randint(0, config.vocab_size, (rows,))
        positions = torch.full((rows,), 110)
        times: dict[str, list[float]] = {name: [] for name in ways}
        with torch.inference_mode():
            outputs = [step(model, d, kv, plan, ids, positions) for d in ways.values()]
            assert torch.equal(*outputs), "the lean step's logits differ from the model's"
            for round_ in range(args.rounds):
                for name in sorted(ways, reverse=round_ % 2 == 1):
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        step(model, ways[name], kv, plan, ids, positions)
                    times[name].append((time.perf_counter() - start) / CALLS * 1000)
        lean_ms, model_ms = (statistics.median(times[name]) for name in ways)
        print(f"{rows:2d} rows: lean {lean_ms:6.1f} ms, model forward {model_ms:6.1f} ms, "
              f"{lean_ms / model_ms:.2f}x (logits equal)")
    engine.shutdown()


if __name__ == "__main__":
    main()
