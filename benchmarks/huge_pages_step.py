"""Decode steps with the engine's memory on 2 MB pages (`engine.huge_pages`) and on 4 KB pages.

Side by side in one process, on SmolLM2 (the packaged model): engine A is built with huge
pages (its weights collapsed once in place, ray_inference/engine/huge_pages.py), then engine B
without, from a second copy of the model, so that B's packed weights stay on 4 KB pages
(printed: the process's huge-page MiB after each). Each gets a KV cache of 64 slots x 256
columns (A's on huge pages, B's not) holding the same values. A lean decode step of 1 and of
64 rows over 111 columns then runs through each, rounds alternating which goes first; prints
the median milliseconds and their ratio, after checking that the logits are equal.

    .venv/bin/python benchmarks/huge_pages_step.py [--rounds 15]
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

FIRST, COLUMN, CALLS = 10, 120, 3


def step(decoder, kv: SlotKV, ids, positions, plan) -> torch.Tensor:
    return decoder.forward(ids, positions, packing.packed_cache(kv.keys, kv.values, plan), plan)


def huge_mib() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        line = next(line for line in rollup if line.startswith("AnonHugePages"))
    return int(line.split()[1]) >> 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    spec = registry.resolve("smollm2")
    ways, engines = {}, []
    for name, huge in (("huge pages", True), ("4 KB pages", False)):
        loaded = loader.load(spec)
        engines.append(create_engine(loaded, EngineConfig(max_batch_size=64, huge_pages=huge)))
        ways[name] = (lean.LeanDecoder(loaded.model), huge)
        print(f"{name}: collapsed {engines[-1].huge_page_bytes >> 20} MiB; the process holds "
              f"{huge_mib()} MiB in huge pages", flush=True)
    config, dtype = loaded.model.config, loaded.dtype
    head_dim = loaded.model.model.layers[0].self_attn.head_dim
    for rows in (1, 64):
        caches = {name: SlotKV(config.num_hidden_layers, config.num_key_value_heads, head_dim,
                               dtype, torch.device("cpu"), 64, 256, 2048, huge)
                  for name, (_, huge) in ways.items()}
        first, second = caches.values()
        for mine, other in zip(first.keys + first.values, second.keys + second.values,
                               strict=True):
            other.copy_(mine.normal_())
        for kv in caches.values():
            kv.valid[:rows, FIRST:COLUMN + 1] = True
        plan = packing.PackedPlan(rows, FIRST, COLUMN,
                                  first.attention_mask(rows, FIRST, COLUMN + 1, dtype), [])
        ids = torch.randint(0, config.vocab_size, (rows,))
        positions = torch.full((rows,), 110)

        times: dict[str, list[float]] = {name: [] for name in ways}
        with torch.inference_mode():
            assert torch.equal(*(step(ways[name][0], caches[name], ids, positions, plan)
                                 for name in ways)), "the logits differ"
            for round_ in range(args.rounds):
                for name in sorted(ways, reverse=round_ % 2 == 1):
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        step(ways[name][0], caches[name], ids, positions, plan)
                    times[name].append((time.perf_counter() - start) / CALLS * 1000)
        huge_ms, small_ms = (statistics.median(times[name]) for name in ways)
        print(f"{rows:2d} rows: huge pages {huge_ms:6.1f} ms, 4 KB pages {small_ms:6.1f} ms, "
              f"{huge_ms / small_ms:.2f}x (logits equal)", flush=True)
    for engine in engines:
        engine.shutdown()


if __name__ == "__main__":
    main()
