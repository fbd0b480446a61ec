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
import functools

import torch
from step_timing import RandomStep, alternating_medians

from ray_inference.config import EngineConfig
from ray_inference.engine import create_engine, lean
from ray_inference.models import loader, registry

CALLS = 3


def step(decoder, random: RandomStep) -> torch.Tensor:
    return decoder.forward(random.ids, random.positions, random.cache(), random.plan)


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
    for rows in (1, 64):
        steps = {}
        for name, (_, huge) in ways.items():
            torch.manual_seed(rows)  # the same ids and K/V values for both
            steps[name] = RandomStep.make(loaded.model, rows, huge)
        with torch.inference_mode():
            assert torch.equal(*(step(ways[name][0], steps[name]) for name in ways)), \
                "the logits differ"
            medians = alternating_medians(
                {name: functools.partial(step, ways[name][0], steps[name]) for name in ways},
                args.rounds, CALLS)
        huge_ms, small_ms = medians.values()
        print(f"{rows:2d} rows: huge pages {huge_ms:6.1f} ms, 4 KB pages {small_ms:6.1f} ms, "
              f"{huge_ms / small_ms:.2f}x (logits equal)", flush=True)
    for engine in engines:
        engine.shutdown()


if __name__ == "__main__":
    main()
