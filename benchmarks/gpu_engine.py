"""The engine alone on a GPU, with random-weight models (no download, no Ray, no HTTP).

    python benchmarks/gpu_engine.py --out /tmp/gpu.json            # on a CUDA machine
    python benchmarks/gpu_engine.py --models tiny --requests 8      # a smoke run on any CPU

For each model shape it runs, on the same requests (prompt and output lengths drawn with a
fixed seed, end of sequence ignored so every variant makes the same tokens): HF padded batches
(`generate`, the bound of static batching); transformers' own continuous batching (its
ContinuousBatchingManager, without and with its CUDA graphs: `hf_cb`, `hf_cb_graphs`); the
rayinfer engine without and with CUDA graphs (`engine`, `engine_graphs`), with graphs but
without overlapping host work with the GPU (`engine_graphs_settled`), and with graphs but
transformers' own attention, K/V copied per query head group (`engine_graphs_hf_attention`),
and with graphs on requests sampled at temperature 1 and top_p 0.95 (`engine_graphs_sampled`;
random weights give flat distributions, so every row's nucleus holds most of the vocabulary:
the sampler's worst case).
It prints a table with ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import sys
import time
import traceback
import unittest.mock
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_inference.engine import GenerationRequest, create_engine, packing
from ray_inference.models.loader import LoadedModel

SHAPES = {
    # SmolLM2-135M's shape.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    # A Llama-3.2-1B-like shape (1.24B parameters).
    "llama-1.24b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 tie_word_embeddings=True),
}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose words are the token ids ("w17"): prompts of exact lengths,
    and real detokenization work for every generated token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def build(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0,
                         eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return LoadedModel(shape, "causal", model, word_tokenizer(config.vocab_size), device, dtype,
                       config.max_position_embeddings, time.perf_counter() - started)


def workload(count, prompt_range, output_range, vocab, seed, shared_prefix=0):
    """Prompts of random words (each its own token), every one starting with the same
    `shared_prefix` words (a system prompt's stand-in), and each request's output length."""
    rng = random.Random(seed)

    def words(n):
        return [f"w{rng.randrange(3, vocab)}" for _ in range(n)]

    prefix = words(shared_prefix)
    prompts = [" ".join(prefix + words(rng.randint(*prompt_range))) for _ in range(count)]
    return prompts, [rng.randint(*output_range) for _ in range(count)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine() -> tuple[torch.device, torch.dtype, str]:
    """The device the GPU benchmarks run on, its dtype (bf16 on a GPU, fp32 on a CPU) and its
    name for their reports."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    return torch.device("cpu"), torch.float32, f"cpu, {torch.get_num_threads()} threads"


def hf_padded(loaded, prompts, lengths, batch):
    tok = loaded.tokenizer
    tok.padding_side = "left"
    sync(loaded.device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        inputs = tok(prompts[i:i + batch], return_tensors="pt", padding=True).to(loaded.device)
        longest = max(lengths[i:i + batch])
        loaded.model.generate(**inputs, max_new_tokens=longest, min_new_tokens=longest,
                              do_sample=False, pad_token_id=0)
    sync(loaded.device)
    return {"seconds": time.perf_counter() - start, "tokens": sum(lengths)}


def hf_continuous(loaded, prompts, lengths, batch, graphs):
    """transformers' own continuous batching (paged attention), each request with its own
    max_new_tokens, through its manager; like the engine, one pass to warm up (graph capture)
    and one measured."""
    from transformers import GenerationConfig

    inputs = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    generation = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)
    settings = {}
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:  # older transformers read these from the generation config
        generation.max_batch_tokens = batch * 64
    else:
        settings["continuous_batching_config"] = ContinuousBatchingConfig(
            max_batch_tokens=batch * 64, use_cuda_graph=graphs)
    manager = loaded.model.init_continuous_batching(generation_config=generation, **settings)
    manager.start()
    try:
        for _ in range(2):
            sync(loaded.device)
            start = time.perf_counter()
            for i, (ids, length) in enumerate(zip(inputs, lengths, strict=True)):
                manager.add_request(ids, request_id=f"r{i}", max_new_tokens=length)
            tokens, finished = 0, 0
            while finished < len(inputs):
                result = manager.get_result(timeout=60)
                if result is None:
                    raise RuntimeError("transformers' continuous batching stopped answering")
                if result.is_finished():
                    finished += 1
                    tokens += len(result.generated_tokens)
            sync(loaded.device)
            seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return {"seconds": seconds, "tokens": tokens, "cuda_graphs": graphs}


# engine_graphs_sampled's requests: sampled as chat clients often ask.
SAMPLED = {"temperature": 1.0, "top_p": 0.95}


async def _drive(engine, prompts, lengths, sampling):
    loop = asyncio.get_running_loop()

    async def one(prompt, length):
        submitted = time.perf_counter()
        stream = engine.submit(GenerationRequest(prompt=prompt, max_tokens=length,
                                                 ignore_eos=True, **sampling), loop)
        first, tokens, ids = None, 0, []
        async for chunk in stream:
            if first is None and chunk.token_ids:
                first = time.perf_counter() - submitted
            tokens += len(chunk.token_ids)
            ids += chunk.token_ids
        return first, tokens, time.perf_counter() - submitted, ids

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True)))
    return time.perf_counter() - start, results


# Every field of EngineConfig with its default (pydantic is not on the GPU machine;
# tests/test_bench.py checks that this stays in step with ray_inference/config.py).
ENGINE_DEFAULTS = dict(dtype="auto", max_batch_size=64, max_queue=256, max_tokens_in_flight=65_536,
                       default_max_tokens=128, torch_threads=None, max_prefill_tokens=4096,
                       cuda_graphs=True, overlap_steps=None, pack_arrivals=32,
                       admit_between_layers=True, lean_decode=True, prefix_cache=True,
                       prepack_weights=True,
                       quantize="none", int4_max_rows="auto", kv_cache_dtype="auto",
                       stream_messages_per_s=100,
                       openmp_spin_count=3_000_000, huge_pages=True,
                       kv_cache_keep_s=300)


def engine_run(loaded, prompts, lengths, batch, graphs, overlap=None, our_attention=True,
               sampling=None, **settings):
    """`sampling`: the requests' temperature and top_p (None: greedy)."""
    sampling = sampling or {"temperature": 0}
    config = SimpleNamespace(**{**ENGINE_DEFAULTS, "max_batch_size": batch,
                                "max_queue": len(prompts) + 1,
                                "max_tokens_in_flight": 10_000_000, "cuda_graphs": graphs,
                                "overlap_steps": overlap, **settings})
    if our_attention:
        engine = create_engine(loaded, config)
    else:  # as if the model's attention could not be replaced: transformers' SDPA path
        with unittest.mock.patch.object(packing, "supported", lambda model: False):
            engine = create_engine(loaded, config)
    # Warm up (CUDA graphs are captured here, once per bucket), then measure.
    asyncio.run(_drive(engine, prompts, lengths, sampling))
    sync(loaded.device)
    before, steps, skipped = engine.describe(), engine.stats.steps, engine.stats.prefix_tokens
    seconds, results = asyncio.run(_drive(engine, prompts, lengths, sampling))
    info = engine.describe()
    info["kv_bytes_peak"] = engine.stats.kv_bytes_peak
    info["steps_measured"] = engine.stats.steps - steps  # prefills and decode steps
    info["prefix_tokens_measured"] = engine.stats.prefix_tokens - skipped  # not prefilled
    if "graph_captures" in info:  # a capture in the measured pass is time it pays for
        info["graph_captures_measured"] = info["graph_captures"] - before["graph_captures"]
    engine.shutdown()
    ttfts = sorted(r[0] for r in results)
    return {"seconds": seconds, "tokens": sum(r[1] for r in results),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * len(ttfts))],
            "ttft_min_s": ttfts[0], "ttft_max_s": ttfts[-1],
            "e2e_p50_s": statistics.median(r[2] for r in results), **info,
            "sampling": sampling, "outputs": [r[3] for r in results]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-1.24b")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-tokens", default="16-128")
    parser.add_argument("--output-tokens", default="16-256")
    parser.add_argument("--variants", default="padded,hf_cb,engine,engine_graphs")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                        help="every prompt starts with the same WORDS tokens (the prefix cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device, dtype, card = machine()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype, dtype)
    import transformers

    report = {"date": datetime.date.today().isoformat(), "device": card,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": str(dtype), "requests": args.requests, "prompt_tokens": args.prompt_tokens,
              "output_tokens": args.output_tokens, "shared_prefix": args.shared_prefix,
              "seed": args.seed, "models": {}}
    print(f"{card}; torch {torch.__version__}; transformers {transformers.__version__}", flush=True)
    prompt_range = tuple(int(x) for x in args.prompt_tokens.split("-"))
    output_range = tuple(int(x) for x in args.output_tokens.split("-"))
    for shape in args.models.split(","):
        loaded = build(shape, device, dtype)
        params = sum(p.numel() for p in loaded.model.parameters())
        print(f"\n{shape}: {params / 1e6:.0f}M parameters, built in {loaded.load_s:.1f}s",
              flush=True)
        prompts, lengths = workload(args.requests, prompt_range, output_range,
                                    SHAPES[shape]["vocab_size"], args.seed, args.shared_prefix)
        runs = {}
        for variant in args.variants.split(","):
            try:
                if variant == "padded":
                    runs[variant] = hf_padded(loaded, prompts, lengths, args.requests)
                elif variant in ("hf_cb", "hf_cb_graphs"):
                    runs[variant] = hf_continuous(loaded, prompts, lengths, args.requests,
                                                  graphs=variant == "hf_cb_graphs")
                elif variant == "engine":
                    runs[variant] = engine_run(loaded, prompts, lengths, args.requests, False)
                elif variant == "engine_graphs":
                    runs[variant] = engine_run(loaded, prompts, lengths, args.requests, True)
                elif variant == "engine_graphs_settled":  # no overlap of host work and GPU
                    runs[variant] = engine_run(loaded, prompts, lengths, args.requests, True,
                                               overlap=False)
                elif variant == "engine_graphs_no_prefix":  # engine.prefix_cache: false
                    runs[variant] = engine_run(loaded, prompts, lengths, args.requests, True,
                                               prefix_cache=False)
                elif variant == "engine_graphs_bf16_kv":  # engine.kv_cache_dtype: bfloat16
                    runs[variant] = engine_run(loaded, prompts, lengths, args.requests, True,
                                               kv_cache_dtype="bfloat16")
                elif variant == "engine_graphs_sampled":  # SAMPLED, not greedy
                    runs[variant] = engine_run(loaded, prompts, lengths, args.requests, True,
                                               sampling=SAMPLED)
                elif variant == "engine_graphs_hf_attention":  # K/V repeated per head group
                    runs[variant] = engine_run(loaded, prompts, lengths, args.requests, True,
                                               our_attention=False)
                else:
                    raise ValueError(f"no variant {variant!r}")
            except Exception as exc:  # one broken variant must not hide the others
                traceback.print_exc()
                runs[variant] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            run = runs[variant]
            run["tok_s"] = round(run["tokens"] / run["seconds"], 1)
            extra = "".join(f" {k}={run[k]}" for k in (
                "ttft_p50_s", "ttft_min_s", "ttft_max_s", "cuda_graphs", "graph_captures",
                "graph_captures_measured", "steps_measured", "prefix_tokens_measured") if k in run)
            print(f"  {variant:<22} {run['tok_s']:>9.1f} tok/s  {run['tokens']} tokens in "
                  f"{run['seconds']:.2f}s{extra}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # Every engine variant's tokens against the first one's (eager, else the first run).
        answered = [name for name, run in runs.items()
                    if "outputs" in run and not run["sampling"].get("temperature")]
        if len(answered) > 1:
            reference = "engine" if "engine" in answered else answered[0]
            expected = runs[reference]["outputs"]
            runs["identical_outputs"] = {"reference": reference}
            for name in answered:
                if name != reference:
                    same = sum(a == b for a, b in zip(runs[name]["outputs"], expected,
                                                      strict=True))
                    runs["identical_outputs"][name] = same
                    print(f"  {name} and {reference} gave identical tokens for "
                          f"{same}/{len(prompts)} requests")
        for run in runs.values():
            if isinstance(run, dict):
                run.pop("outputs", None)
        base = runs.get("padded", {}).get("tok_s")
        if base:
            for name, run in runs.items():
                if isinstance(run, dict) and "tok_s" in run:
                    run["x_padded"] = round(run["tok_s"] / base, 2)
                    print(f"  {name:<22} {run['x_padded']:>6.2f}x padded batches")
        report["models"][shape] = {"parameters": params, "runs": runs}
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
