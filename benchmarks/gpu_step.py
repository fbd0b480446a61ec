"""One decode step on a GPU, side by side: transformers' attention against rayinfer's.

For each model shape (random weights, as in gpu_engine.py) it fills a SlotKV of ROWS slots x
COLUMNS columns and times, alternating rounds in one process:
- the whole decode step replayed as the engine's CUDA graph (graphs.py), once captured with
  transformers' SDPA attention (K/V copied once per query head group, as any masked step gets it
  there) and once with packing.py's decode attention (each K/V head read once);
- the attention call of one layer alone, in three forms: K/V repeated, SDPA's `enable_gqa`
  (what decode_attention runs), and the query head groups folded into the query length.
Prints median milliseconds and ratios, checks that both steps pick the same next tokens, and
writes JSON.

    python benchmarks/gpu_step.py --out step.json                 # on a CUDA machine
    python benchmarks/gpu_step.py --models tiny --rows 8 --columns 64   # a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_engine import build, machine, sync
from ray_inference.engine import packing
from ray_inference.engine.causal import cache_keyword
from ray_inference.engine.graphs import DecodeGraphs
from ray_inference.engine.kv import SlotKV


def timed(run, device: torch.device, calls: int) -> float:
    """Median milliseconds of `calls` calls, each waited for."""
    times = []
    for _ in range(calls):
        sync(device)
        began = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def step_runs(loaded, rows: int, columns: int) -> dict:
    """The decode step, as the engine runs it, with either attention."""
    model, device, dtype = loaded.model, loaded.device, loaded.dtype
    config = model.config
    kv = SlotKV(config.num_hidden_layers, config.num_key_value_heads,
                config.hidden_size // config.num_attention_heads, dtype, device, rows, columns,
                columns)
    generator = torch.Generator(device).manual_seed(0)
    for tensor in kv.keys + kv.values:  # a plausible history: small random K/V
        tensor.normal_(std=0.5, generator=generator)
    # Rows of different lengths, as in a running batch: each starts somewhere in the first half.
    starts = torch.randint(0, columns // 2, (rows, 1), device=device, generator=generator)
    kv.valid[:] = torch.arange(columns, device=device)[None] >= starts
    column = columns - 1
    tokens = torch.randint(3, config.vocab_size, (rows,), device=device, generator=generator)
    positions = (column - starts[:, 0]).clamp(min=0)

    cache_arg = cache_keyword(model)  # the GPU machine's transformers may be older

    def forward(ids, mask, where, cache):
        return model(input_ids=ids, attention_mask=mask, position_ids=where, use_cache=True,
                     logits_to_keep=1, **{cache_arg: cache}).logits[:, -1, :]

    def attention(ours: bool) -> None:
        (packing.enable if ours else packing.disable)(model)

    def runner(ours: bool):
        """The step as the engine's DecodeGraphs runs it: captured on a GPU (with the attention
        in force now), run eagerly on a CPU (a smoke run)."""
        attention(ours)
        graphs = DecodeGraphs(forward, dtype, capture=device.type == "cuda")
        graphs.step(kv, rows, columns, tokens, positions, column)  # captured here
        return lambda: graphs.step(kv, rows, columns, tokens, positions, column)

    with torch.inference_mode():
        # name: (step, whether it runs rayinfer's attention); switched outside the timed calls
        # (a captured graph keeps its own; an eager step reads the model's).
        runs = {"transformers' attention": (runner(False), False),
                "rayinfer's attention": (runner(True), True)}
        next_tokens = {}
        for name, (run, ours) in runs.items():
            attention(ours)
            next_tokens[name] = run().argmax(-1)
        same = (next_tokens["transformers' attention"]
                == next_tokens["rayinfer's attention"]).float().mean().item()
        times = {name: [] for name in runs}
        for _ in range(3):
            for name, (run, ours) in runs.items():
                attention(ours)
                times[name].append(timed(run, device, 20))
    packing.disable(model)
    return {"ms": {name: statistics.median(t) for name, t in times.items()},
            "same_next_token": same}


def attention_runs(loaded, rows: int, columns: int) -> dict:
    """One layer's attention call alone, three ways."""
    config, device, dtype = loaded.model.config, loaded.device, loaded.dtype
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim, group = config.hidden_size // heads, heads // kv_heads
    generator = torch.Generator(device).manual_seed(1)
    query = torch.randn(rows, heads, 1, dim, device=device, dtype=dtype, generator=generator)
    key, value = (torch.randn(rows, kv_heads, columns, dim, device=device, dtype=dtype,
                              generator=generator) for _ in range(2))
    valid = torch.rand(rows, columns, device=device, generator=generator) > 0.3
    mask = (~valid)[:, None, None, :].to(dtype) * torch.finfo(dtype).min
    forms = {
        "K/V repeated": lambda: F.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
            attn_mask=mask),
        "enable_gqa": lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                             enable_gqa=True),
        # Each K/V head's group of query heads as the query length of a plain SDPA call.
        "folded": lambda: F.scaled_dot_product_attention(
            query.view(rows, kv_heads, group, dim), key, value, attn_mask=mask),
    }
    with torch.inference_mode():
        times = {name: [] for name in forms}
        for _ in range(3):
            for name, run in forms.items():
                times[name].append(timed(run, device, 50))
    return {"ms": {name: statistics.median(t) for name, t in times.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-1.24b")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--columns", type=int, default=512)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device, dtype, card = machine()
    report = {"device": card, "torch": torch.__version__, "rows": args.rows,
              "columns": args.columns, "models": {}}
    print(f"{card}; torch {torch.__version__}; {args.rows} rows x {args.columns} columns",
          flush=True)
    for shape in args.models.split(","):
        loaded = build(shape, device, dtype)
        step = step_runs(loaded, args.rows, args.columns)
        attention = attention_runs(loaded, args.rows, args.columns)
        report["models"][shape] = {"step": step, "attention": attention}
        theirs, ours = step["ms"].values()
        print(f"\n{shape}: decode step as a CUDA graph" if device.type == "cuda"
              else f"\n{shape}: decode step (eager)")
        for name, ms in step["ms"].items():
            print(f"  {name:26s} {ms:8.3f} ms")
        print(f"  rayinfer's / transformers': {ours / theirs:.2f}; same next token for "
              f"{step['same_next_token']:.0%} of rows")
        print("  one layer's attention:")
        base = attention["ms"]["K/V repeated"]
        for name, ms in attention["ms"].items():
            print(f"    {name:24s} {ms:8.3f} ms  {ms / base:5.2f}x K/V repeated")
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
