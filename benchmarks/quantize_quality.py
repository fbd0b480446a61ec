"""What `engine.quantize: int8` costs SmolLM2 in quality (ray_inference/engine/quantize.py).

Side by side in one process: SmolLM2 in fp32, in bf16, with `quantize` (every linear layer but
the output layer in int8) and with the output layer in int8 too. For each: perplexity over the
first 12 chunks of 512 tokens of this project's docs and README, and for the first 16 prompts
of the benchmark's workload, the token at which its greedy answer first differs from fp32's
(48: not within 48 tokens; where one answer ends first, its length).

    .venv/bin/python benchmarks/quantize_quality.py
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from ray_inference.bench.prompts import Workload
from ray_inference.engine import quantize
from ray_inference.models import loader, registry

ROOT = Path(__file__).resolve().parent.parent
CHUNK, CHUNKS, ANSWER = 512, 12, 48


def variants():
    spec = registry.resolve("smollm2")
    yield "fp32", loader.load(spec, "float32").model
    yield "bf16", loader.load(spec, "bfloat16").model
    model = loader.load(spec, "float32").model
    quantize.quantize(model)
    yield "int8 (engine.quantize)", model
    model.lm_head = quantize.Int8Linear(model.lm_head)
    yield "int8, output layer too", model


def main() -> None:
    tokenizer = loader.load(registry.resolve("smollm2"), "float32").tokenizer
    text = "\n".join(p.read_text() for p in [*sorted((ROOT / "docs").glob("*.md")),
                                             ROOT / "README.md"])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    chunks = [ids[i:i + CHUNK][None] for i in range(0, CHUNK * CHUNKS, CHUNK)]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
               for m in Workload.make(16, 64, 128, 0).messages]
    reference = None
    print(f"perplexity over {sum(c.shape[1] for c in chunks)} tokens; greedy answers against "
          f"fp32's, {len(prompts)} prompts")
    for name, model in variants():
        with torch.inference_mode():
            loss = statistics.mean(model(c, labels=c).loss.item() for c in chunks)
            answers = [model.generate(**p, max_new_tokens=ANSWER, do_sample=False)
                       [0, p["input_ids"].shape[1]:].tolist() for p in prompts]
        reference = reference or answers
        # Where an answer ended (EOS) before the other, that is where they part.
        parted = [next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False))
                        if a != b), min(len(mine), len(theirs)))
                  for mine, theirs in zip(answers, reference, strict=True)]
        print(f"{name:24s} perplexity {math.exp(loss):7.3f}  greedy answer parts at token "
              f"(median) {statistics.median(parted):4.1f}  {parted}", flush=True)


if __name__ == "__main__":
    main()
