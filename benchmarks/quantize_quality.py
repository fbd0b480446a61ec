"""What `engine.quantize: int8` (ray_inference/engine/quantize.py), `engine.kv_cache_dtype:
bfloat16` and `engine.int4_max_rows` (int4.py) cost SmolLM2 in quality.

Side by side in one process: SmolLM2 in fp32, in bf16, in fp32 with attention over bf16 K/V,
with `quantize` (every linear layer but the output layer in int8), with both, with the
output layer in int8 too, and with 4-bit copies of its layers for products of at most 16 rows
(the default: the greedy answers' decode steps run on them, perplexity's 512-token passes
do not) and for every product. Attention over bf16 K/V runs as the engine's decode steps run it
(the query cast to bf16, the output back): for perplexity at every token (an upper bound: the
engine's prefill attends over its prompt's fp32 K/V), for greedy answers at decode steps only,
as in the engine. For each: perplexity over the
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
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ray_inference.bench.prompts import Workload
from ray_inference.engine import int4, quantize
from ray_inference.models import loader, registry

ROOT = Path(__file__).resolve().parent.parent
CHUNK, CHUNKS, ANSWER = 512, 12, 48


# Attention over bf16 K/V at every token, or at decode steps (one query token) only.
EVERY_TOKEN, DECODE_STEPS = "bf16_kv_every_token", "bf16_kv_decode_steps"


def _attention_over_bf16_kv(every_token: bool):
    def attention(module, query, key, value, *args, **kwargs):
        if not every_token and query.shape[2] > 1:
            return sdpa_attention_forward(module, query, key, value, *args, **kwargs)
        out, weights = sdpa_attention_forward(module, query.bfloat16(), key.bfloat16(),
                                              value.bfloat16(), *args, **kwargs)
        return out.to(query.dtype), weights
    return attention


for _name, _every in ((EVERY_TOKEN, True), (DECODE_STEPS, False)):
    AttentionInterface.register(_name, _attention_over_bf16_kv(_every))
    AttentionMaskInterface.register(_name, sdpa_mask)


def bf16_kv(model):
    model.set_attn_implementation(EVERY_TOKEN)
    return model


def variants():
    spec = registry.resolve("smollm2")
    yield "fp32", loader.load(spec, "float32").model
    yield "bf16", loader.load(spec, "bfloat16").model
    yield "fp32, bf16 K/V", bf16_kv(loader.load(spec, "float32").model)
    model = loader.load(spec, "float32").model
    quantize.quantize(model, if_fast=False)  # its quality, however slow here
    yield "int8 (engine.quantize)", model
    yield "int8, bf16 K/V", bf16_kv(model)
    model.set_attn_implementation("sdpa")
    model.lm_head = quantize.Int8Linear(model.lm_head)
    yield "int8, output layer too", model
    model = loader.load(spec, "float32").model
    int4.add_copies(model, int4.AUTO_MAX_ROWS, only_exact=True)
    yield f"int4 copies, <= {int4.AUTO_MAX_ROWS} rows", model
    for layer in model.modules():
        if isinstance(layer, int4.FewRowsInt4Linear):
            layer.max_rows = 1 << 30
    yield "int4 copies, every product", model


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
            if model.config._attn_implementation == EVERY_TOKEN:
                model.set_attn_implementation(DECODE_STEPS)
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
