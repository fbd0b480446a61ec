"""The sampler alone, side by side with transformers' way of sampling, on the same logits.

    .venv/bin/python benchmarks/sampling.py                        # CPU, SmolLM2's logits
    python benchmarks/sampling.py --logits random --out s.json     # on a GPU machine

For each batch size and setting it times one next-token choice for the whole batch:
`transformers` (what `generate(do_sample=True)` does each step: its temperature and top_p
warpers, a softmax and one `torch.multinomial` for the batch) against rayinfer's
`engine.sampling.sample`, with unseeded rows and with a seed per row. The logits are
SmolLM2's for the benchmark's prompts (`smollm2`: peaked, as a trained model's are) or drawn
at random (`random`: flat, a nucleus of most of the vocabulary, the worst case for top_p).
Medians of --repeats calls; prints milliseconds and transformers' time over ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_engine import machine
from benchmarks.gpu_step import timed
from ray_inference.engine.sampling import SamplingParams, sample

SETTINGS = [(1.0, 1.0), (0.7, 0.9), (1.0, 0.95)]  # (temperature, top_p)


def smollm2_logits(rows: int) -> torch.Tensor:
    """SmolLM2's logits for its first answer token to the benchmark's prompts."""
    from ray_inference.bench.prompts import Workload, chat_text
    from ray_inference.models import loader, registry

    loaded = loader.load(registry.resolve("smollm2"))
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    texts = [chat_text(tokenizer, m) for m in Workload.make(rows, 1, 1, 0).messages]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        return loaded.model(**batch).logits[:, -1].float()


def transformers_sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(None, logits)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def compare(logits: torch.Tensor, temperature: float, top_p: float, device: torch.device,
            repeats: int) -> dict[str, float]:
    rows = len(logits)
    unseeded = [SamplingParams.create(temperature, top_p, None) for _ in range(rows)]
    seeded = [SamplingParams.create(temperature, top_p, i) for i in range(rows)]
    calls = {"transformers_ms": lambda: transformers_sample(logits, temperature, top_p),
             "rayinfer_ms": lambda: sample(logits, unseeded),
             "rayinfer_seeded_ms": lambda: sample(logits, seeded)}
    for call in calls.values():
        call()  # warm up
    return {name: round(timed(call, device, repeats), 3) for name, call in calls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logits", choices=["smollm2", "random"], default="smollm2")
    parser.add_argument("--batch", default="1,16,64,128")
    parser.add_argument("--vocab", type=int, default=49152, help="random logits' vocabulary")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, _, name = machine()
    sizes = [int(b) for b in args.batch.split(",")]
    if args.logits == "smollm2":
        source = smollm2_logits(max(sizes))
    else:
        source = torch.randn(max(sizes), args.vocab, generator=torch.Generator().manual_seed(0))
    source = source.to(device)
    print(f"{name}; {args.logits} logits, vocabulary {source.shape[1]}; medians of {args.repeats}")
    print(f"{'rows':>5} {'temperature':>11} {'top_p':>5} {'transformers':>12} "
          f"{'rayinfer':>9} {'seeded':>8} {'x':>6}")
    results = []
    for rows in sizes:
        for temperature, top_p in SETTINGS:
            result = compare(source[:rows], temperature, top_p, device, args.repeats)
            print(f"{rows:>5} {temperature:>11} {top_p:>5} {result['transformers_ms']:>10.2f}ms "
                  f"{result['rayinfer_ms']:>7.2f}ms {result['rayinfer_seeded_ms']:>6.2f}ms "
                  f"{result['transformers_ms'] / result['rayinfer_ms']:>5.1f}x", flush=True)
            results.append({"rows": rows, "temperature": temperature, "top_p": top_p, **result})
    if args.out:
        args.out.write_text(json.dumps({"device": name, "logits": args.logits,
                                        "vocab": source.shape[1], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
