"""The padded batches of fill-mask (BERT) and text-to-text (T5) models on a GPU, with PyTorch's
choice of SDPA kernel against every kernel but cuDNN's (docs/benchmarks.md).

    python benchmarks/gpu_padded.py --out /tmp/padded.json     # on a CUDA machine
    python benchmarks/gpu_padded.py --batches 4                # a smoke run on any CPU

Random-weight models of DistilBERT's and T5-small's shapes (config only, nothing to download)
run what `engine.padded.PaddedEngine` runs for a batch: one forward pass (fill-mask) or one
greedy `generate` (text-to-text), over --batches batches whose sizes (1-32) and widths (8-128
tokens) are drawn with a fixed seed, as a worker's batches come in ever new shapes. In each of
two rounds (a draw of their own, the variants' order swapped) both variants run the same
batches twice: the first pass meets every shape for the first time, the second meets them
again. It prints seconds per pass, and the SDPA calls and cuDNN attention ops that the
profiler saw in one new batch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_engine import machine, sync
from ray_inference.engine import sdpa


def build(kind: str, device: torch.device, dtype: torch.dtype):
    from transformers import (
        DistilBertConfig,
        DistilBertForMaskedLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if kind == "distilbert":
        config = DistilBertConfig(attn_implementation="sdpa")
        model = DistilBertForMaskedLM(config)
    else:
        config = T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64,
                          decoder_start_token_id=0, attn_implementation="sdpa")
        model = T5ForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval(), config.vocab_size


def batches(count: int, vocab: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = random.Random(seed)
    drawn = []
    for _ in range(count):
        size, width = rng.randint(1, 32), rng.randint(8, 128)
        lengths = [rng.randint(4, width) for _ in range(size)]
        lengths[0] = width
        ids = torch.zeros(size, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, length in enumerate(lengths):
            ids[row, :length] = torch.tensor([rng.randrange(5, vocab) for _ in range(length)])
            mask[row, :length] = 1
        drawn.append((ids, mask))
    return drawn


def run_batch(model, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.inference_mode():
        if kind == "distilbert":
            model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        else:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                           min_new_tokens=16, do_sample=False)


def one_pass(model, kind: str, work, device: torch.device, without_cudnn: bool) -> float:
    start = time.perf_counter()
    for ids, mask in work:
        kernels = sdpa.new_shape_backends(device) if without_cudnn else contextlib.nullcontext()
        with kernels:
            run_batch(model, kind, ids.to(device), mask.to(device))
    sync(device)
    return time.perf_counter() - start


def attention_calls(model, kind: str, ids, mask, device: torch.device,
                    without_cudnn: bool) -> dict[str, int]:
    """The calls of SDPA, and of cuDNN's attention kernel among them, in one batch."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_pass(model, kind, [(ids, mask)], device, without_cudnn)
    events = prof.key_averages()
    return {"sdpa": sum(e.count for e in events if e.key == "aten::scaled_dot_product_attention"),
            "cudnn": sum(e.count for e in events if "cudnn_attention" in e.key)}


VARIANTS = ("pytorch's choice", "without cuDNN")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="distilbert,t5-small")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device, dtype, card = machine()
    print(f"{card}; torch {torch.__version__}; {args.batches} batches per pass", flush=True)
    report = {"date": datetime.date.today().isoformat(), "device": card,
              "torch": torch.__version__, "batches": args.batches, "models": {}}
    for kind in args.models.split(","):
        model, vocab = build(kind, device, dtype)
        one_pass(model, kind, batches(1, vocab, args.seed), device, False)  # the first call
        runs = {}
        # Both variants run the same batches, in one order and then, on another draw, in the
        # other: cuDNN meets every shape for the first time in both rounds (the other
        # variant plans nothing for it), and neither always goes first.
        for number, order in enumerate((VARIANTS, VARIANTS[::-1]), start=1):
            work = batches(args.batches, vocab, args.seed + number)
            for variant in order:
                without = variant == "without cuDNN"
                first = one_pass(model, kind, work, device, without)
                again = one_pass(model, kind, work, device, without)
                calls = attention_calls(model, kind, *batches(1, vocab, args.seed + 10 * number
                                                              + len(runs))[0], device, without)
                runs[f"round {number}, {variant}"] = {
                    "first_pass_s": round(first, 3), "second_pass_s": round(again, 3),
                    "attention_calls_in_one_new_batch": calls}
                print(f"  {kind:<10} round {number} {variant:<17} first pass {first:7.2f} s, "
                      f"again {again:7.2f} s; one new batch: {calls['sdpa']} SDPA calls, "
                      f"{calls['cudnn']} cuDNN attention ops", flush=True)
        report["models"][kind] = runs
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
