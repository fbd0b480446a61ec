"""Why arrivals ride in the decode step (ray_inference/engine/packing.py).

Side by side in one process, on SmolLM2 (the packaged model): a decode step of ROWS rows over
COLUMNS columns of history, once through transformers' SDPA path (K/V repeated per query head
group, as a masked step gets it there) and once through packing.py's attention with no arrival
(grouped-query SDPA: how the engine runs every CPU decode step); the prefill of one arrival's
12 prompt tokens after a cached 24-token prefix in a pass of its own; and one packed pass that
does the step and the prefill. Prints the median milliseconds of each, rounds alternating, and
the ratios; then checks that the packed pass's argmax agrees with the separate passes'.

    .venv/bin/python benchmarks/packed_step.py [--rows 64] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from ray_inference.engine import packing
from ray_inference.engine.kv import SlotKV
from ray_inference.models import loader, registry

PREFIX, NEW, COLUMNS = 24, 12, 150


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=12)
    args = parser.parse_args()

    loaded = loader.load(registry.resolve("smollm2"), args.dtype)
    model, dtype, rows = loaded.model, loaded.dtype, args.rows
    config = model.config
    packing.enable(model)
    kv = SlotKV(config.num_hidden_layers, config.num_key_value_heads,
                config.hidden_size // config.num_attention_heads, dtype, torch.device("cpu"),
                rows + 1, COLUMNS + 1, COLUMNS + 1)
    generator = torch.Generator().manual_seed(0)
    for tensor in kv.keys + kv.values:  # a plausible history: small random K/V
        tensor.normal_(std=0.5, generator=generator)
    kv.valid[:rows, :COLUMNS] = True
    column = COLUMNS
    tokens = torch.randint(100, 5000, (rows,), generator=generator)
    positions = torch.full((rows,), COLUMNS)
    prefix = torch.randint(100, 5000, (1, PREFIX), generator=generator)
    new = torch.randint(100, 5000, (1, NEW), generator=generator)
    prefix_cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prefix, cache=prefix_cache, use_cache=True, logits_to_keep=1)

    def decode() -> torch.Tensor:
        kv.valid[:rows, column] = True
        mask = kv.attention_mask(rows, 0, column + 1, dtype)
        return model(input_ids=tokens[:, None], attention_mask=mask,
                     position_ids=positions[:, None], cache=kv.view(rows, 0, column + 1, column),
                     use_cache=True, logits_to_keep=1).logits[:, -1]

    def prefill() -> torch.Tensor:
        cache = DynamicCache(ddp_cache_data=[(layer.keys.clone(), layer.values.clone())
                                             for layer in prefix_cache.layers])
        return model(input_ids=new, attention_mask=torch.ones(1, PREFIX + NEW, dtype=torch.long),
                     position_ids=torch.arange(PREFIX, PREFIX + NEW)[None], cache=cache,
                     use_cache=True, logits_to_keep=1).logits[:, -1]

    def grouped() -> torch.Tensor:
        kv.valid[:rows, column] = True
        mask = kv.attention_mask(rows, 0, column + 1, dtype)
        plan = packing.PackedPlan(rows, 0, column, mask, [])
        return model(input_ids=tokens[None], attention_mask=mask[:1, :, :, :1],
                     position_ids=positions[None],
                     cache=packing.packed_cache(kv.keys, kv.values, plan), use_cache=True,
                     logits_to_keep=plan.keep(torch.device("cpu")),
                     **{packing.PLAN: plan}).logits[0]

    def packed() -> torch.Tensor:
        slot, start = rows, column + 1 - PREFIX - NEW
        for keys, values, layer in zip(kv.keys, kv.values, prefix_cache.layers, strict=True):
            keys[slot, :, start:start + PREFIX] = layer.keys[0]
            values[slot, :, start:start + PREFIX] = layer.values[0]
        kv.valid[:rows, column] = True
        mask = kv.attention_mask(rows, 0, column + 1, dtype)
        plan = packing.PackedPlan(rows, 0, column, mask, [packing.Arrival(
            slot, 0, NEW, start, packing.arrival_mask(PREFIX, NEW, torch.device("cpu")))])
        ids = torch.cat([tokens, new[0]])[None]
        where = torch.cat([positions, torch.arange(PREFIX, PREFIX + NEW)])[None]
        return model(input_ids=ids, attention_mask=mask[:1, :, :, :1], position_ids=where,
                     cache=packing.packed_cache(kv.keys, kv.values, plan), use_cache=True,
                     logits_to_keep=plan.keep(torch.device("cpu")),
                     **{packing.PLAN: plan}).logits[0]

    def attention(ours: bool) -> None:
        """rayinfer's attention, or transformers' own SDPA path (K/V repeated per group)."""
        (packing.enable if ours else packing.disable)(model)

    # name: (pass, whether it runs rayinfer's attention); switched outside the timed calls.
    passes = {"decode, K/V repeated": (decode, False), "decode, grouped-query": (grouped, True),
              "arrival's own prefill": (prefill, True), "packed pass": (packed, True)}
    times: dict[str, list[float]] = {name: [] for name in passes}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (run, ours) in passes.items():
                attention(ours)
                for _ in range(args.calls):
                    began = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - began)
        attention(False)
        repeated = decode().argmax(-1)
        attention(True)
        same_grouped = (grouped().argmax(-1) == repeated).float().mean().item()
        same_rows = (packed()[:rows].argmax(-1) == grouped().argmax(-1)).float().mean().item()
        same_arrival = bool(packed()[rows].argmax() == prefill()[0].argmax())
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    print(f"SmolLM2 {dtype}, {torch.get_num_threads()} threads, {rows} rows x {COLUMNS} "
          f"columns, an arrival of {NEW} tokens after a cached {PREFIX}:")
    for name, ms in medians.items():
        print(f"  {name:24s} {ms:7.1f} ms")
    step = medians["decode, grouped-query"]
    separate = step + medians["arrival's own prefill"]
    print(f"  grouped-query / K/V repeated:               "
          f"{step / medians['decode, K/V repeated']:.2f}")
    print(f"  packed / (grouped-query decode + prefill):  {medians['packed pass'] / separate:.2f}")
    print(f"  packed / grouped-query decode alone:        {medians['packed pass'] / step:.2f}")
    print(f"  argmax agrees: grouped-query rows with repeated {same_grouped:.0%}; packed rows "
          f"with grouped-query {same_rows:.0%}; arrival with its own prefill {same_arrival}")


if __name__ == "__main__":
    main()
