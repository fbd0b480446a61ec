"""Offline benchmark: one process, one run, the same prompts through three variants.

(a) one request at a time with HF `generate` (the seed's way), (b) HF static batches of the
same size as the concurrency (the bound for padded batching), (c) our continuous-batching
engine with every request submitted at once. Every variant makes exactly `max_tokens` tokens
per prompt (end-of-sequence ignored), so tok/s compare like for like.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.", "What is machine learning?", "Name three primary colors.",
    "How do airplanes fly?", "Give me a recipe for pancakes.", "What is Ray in Python?",
    "Summarize the plot of Hamlet.", "Why is the sky blue?", "List four planets.",
    "What does a CPU do?", "Tell me a fun fact about cats.", "How do vaccines work?",
    "What is the speed of light?", "Describe a rainbow.",
]


@dataclass
class Result:
    variant: str
    requests: int
    tokens: int
    seconds: float
    ttft_p50_s: float | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def _prompts(count: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(QUESTIONS)}] for _ in range(count)]


def _encode(loaded, messages_list):
    texts = [loaded.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in messages_list]
    loaded.tokenizer.padding_side = "left"
    return loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _hf_generate(loaded, messages_list, max_tokens: int) -> int:
    batch = _encode(loaded, messages_list)
    out = loaded.model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]


def one_at_a_time(loaded, prompts, max_tokens) -> Result:
    start = time.perf_counter()
    tokens = sum(_hf_generate(loaded, [p], max_tokens) for p in prompts)
    return Result("a: HF generate, one at a time", len(prompts), tokens,
                  time.perf_counter() - start)


def static_batches(loaded, prompts, max_tokens, batch_size) -> Result:
    start = time.perf_counter()
    tokens = sum(_hf_generate(loaded, prompts[i:i + batch_size], max_tokens)
                 for i in range(0, len(prompts), batch_size))
    return Result(f"b: HF static batches of {batch_size}", len(prompts), tokens,
                  time.perf_counter() - start)


def engine_run(loaded, prompts, max_tokens, batch_size) -> Result:
    from ray_inference.config import EngineConfig
    from ray_inference.engine import GenerationRequest, create_engine

    engine = create_engine(loaded, EngineConfig(max_batch_size=batch_size))
    start = time.perf_counter()
    streams = [engine.submit(GenerationRequest(messages=p, max_tokens=max_tokens, temperature=0,
                                               ignore_eos=True)) for p in prompts]
    ttfts, tokens = [], 0
    for stream in streams:
        for i, chunk in enumerate(stream):
            if i == 0:
                ttfts.append(time.perf_counter() - start)
            tokens += len(chunk.token_ids)
    seconds = time.perf_counter() - start
    engine.shutdown()
    return Result(f"c: rayinfer engine, {batch_size} concurrent", len(prompts), tokens, seconds,
                  statistics.median(ttfts))


def run(concurrency: int = 16, max_tokens: int = 64, sequential: int = 4, seed: int = 0,
        out: Path | None = None, echo=print) -> list[Result]:
    from ray_inference.models import loader, registry

    torch.manual_seed(seed)
    loaded = loader.load(registry.resolve("smollm2"))
    prompts = _prompts(concurrency, seed)
    echo(f"model smollm2 on {loaded.device} ({loaded.dtype}), {torch.get_num_threads()} threads, "
         f"{concurrency} prompts x {max_tokens} tokens")
    results = []
    for step in (lambda: one_at_a_time(loaded, prompts[:sequential], max_tokens),
                 lambda: static_batches(loaded, prompts, max_tokens, concurrency),
                 lambda: engine_run(loaded, prompts, max_tokens, concurrency)):
        results.append(step())
        echo(f"  done: {results[-1].variant} ({results[-1].seconds:.1f}s)")
    base_a, base_b = results[0].tok_s, results[1].tok_s
    echo(f"\n{'variant':<36} {'tok/s':>8} {'x (a)':>7} {'x (b)':>7} {'TTFT p50':>9}")
    for r in results:
        ttft = f"{r.ttft_p50_s:.2f}s" if r.ttft_p50_s is not None else "-"
        echo(f"{r.variant:<36} {r.tok_s:>8.1f} {r.tok_s / base_a:>7.2f} {r.tok_s / base_b:>7.2f} "
             f"{ttft:>9}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"concurrency": concurrency, "max_tokens": max_tokens,
                                   "device": str(loaded.device), "dtype": str(loaded.dtype),
                                   "results": [{**asdict(r), "tok_s": r.tok_s} for r in results]},
                                  indent=2))
    return results
