"""The KV cache in another dtype than the model's (`engine.kv_cache_dtype`): an fp32 model
with bf16 K/V, on every decode path of a CPU engine."""

from __future__ import annotations

import logging

import pytest
import torch

from ray_inference.config import ConfigError, EngineConfig, from_dict
from ray_inference.engine import GenerationRequest, create_engine
from ray_inference.engine.packing import decode_attention
from ray_inference.models import loader, registry
from tests.test_engine import assert_all_match_generate, decode_step_inputs, graph_path, load, run


def test_decode_attention_reads_bf16_kv_in_bf16_and_answers_in_the_querys_dtype():
    query, key, value, valid = decode_step_inputs()
    mask = (~valid)[:, None, None, :].to(torch.bfloat16) * torch.finfo(torch.bfloat16).min

    out = decode_attention(query, key.bfloat16(), value.bfloat16(), mask, 0.3)

    rows, heads, _, dim = query.shape
    assert out.dtype == torch.float32 and out.shape == (rows, 1, heads, dim)
    in_bf16 = decode_attention(query.bfloat16(), key.bfloat16(), value.bfloat16(), mask, 0.3)
    assert torch.equal(out, in_bf16.float())
    exact = decode_attention(query, key, value, mask.float(), 0.3)
    torch.testing.assert_close(out, exact, atol=0.03, rtol=0.03)


PATHS = {"packed steps": {}, "packed arrivals": {"pack_arrivals": True},
         "overlapped steps": {"overlap_steps": True}, "graph path": {"overlap_steps": True}}
# How far below the fp32 model's best logit a token the engine picks may be. The tiny model's
# top two logits are often within 0.001 (its logits spread about 0.12), so bf16's rounding of
# K/V may pick the runner-up; a K/V read from the wrong column picked tokens 0.1-0.39 below.
NEAR_TIE = 0.01


def gaps_to_fp32_greedy(loaded, prompt: str, answer: list[int]) -> torch.Tensor:
    """For each answer token: how far its logit is below the best, by the model in fp32 over
    the prompt and the answer so far (one pass, no cache)."""
    ids = loaded.tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([ids + answer])).logits[0]
    rows = logits[len(ids) - 1:len(ids) - 1 + len(answer)]
    return rows.max(dim=-1).values - rows[torch.arange(len(answer)), torch.tensor(answer)]


@pytest.mark.parametrize("path", PATHS)
def test_a_bf16_cache_picks_fp32s_greedy_tokens_on_every_decode_path(model_dir, path):
    """Prompts of different lengths, some sharing a start the prefix cache learns, arrive
    one by one while a batch runs; every token each answer gets is the fp32 model's greedy
    choice, or within a near tie of it."""
    loaded, engine = load(model_dir, "tiny-llama", sharpen=True, kv_cache_dtype="bfloat16",
                          **PATHS[path])
    if path == "graph path":
        graphs = graph_path(engine)
    engine._eos = set()
    shared = "the cat is a dog of no red blue green hello world " * 2
    # The first two teach the prefix cache their shared start; the third starts from it.
    prompts = [(shared + "hello", 30), (shared + "what", 12), (shared + "of france ?", 20),
               ("red", 40), ("hello world", 9), ("what is the capital of france ?", 16)]
    streams = []
    for prompt, n in prompts:  # each has its first token before the next arrives
        stream = engine.submit(GenerationRequest(prompt=prompt, temperature=0, max_tokens=n))
        streams.append((stream, list(next(iter(stream)).token_ids)))
    for (prompt, n), (stream, start) in zip(prompts, streams, strict=True):
        answer = start + [t for c in stream for t in c.token_ids]
        assert len(answer) == n
        gaps = gaps_to_fp32_greedy(loaded, prompt, answer)
        assert gaps.max() <= NEAR_TIE, (prompt, gaps)
    assert engine.stats.max_batch > 1 and engine.stats.prefix_tokens > 0
    if path == "graph path":
        assert graphs.replays > 0
    assert engine.describe()["kv_dtype"] == "bfloat16"
    engine.shutdown()


def test_a_bf16_cache_takes_half_the_memory_and_the_actor_says_so(model_dir):
    peaks, numerics = {}, {}
    for kv_cache_dtype in ("bfloat16", "auto"):
        _, engine = load(model_dir, "tiny-llama", kv_cache_dtype=kv_cache_dtype)
        # One slot, one chunk of columns. Greedy and past EOS: a sampled first token could be
        # EOS, which ends the request at its prefill, before any cache exists (seen in CI).
        chunks = run(engine, prompt="hello world", max_tokens=3, temperature=0,
                     ignore_eos=True)
        assert sum(len(c.token_ids) for c in chunks) == 3
        peaks[kv_cache_dtype] = engine.stats.kv_bytes_peak
        numerics[kv_cache_dtype] = engine.numerics()  # `rayinfer actors` shows it
        engine.shutdown()
    assert peaks["auto"] > 0 and peaks["bfloat16"] * 2 == peaks["auto"]
    assert numerics == {"bfloat16": "fp32 kv:bf16", "auto": "fp32"}


def test_a_model_without_the_engines_attention_keeps_its_kv_dtype(model_dir, caplog):
    """Eager attention (transformers' own) would meet bf16 K/V with an fp32 query: the
    setting is refused with a warning that names it, and answers stay exact."""
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), "float32")
    loaded.model.set_attn_implementation("eager")
    with caplog.at_level(logging.WARNING):
        engine = create_engine(loaded, EngineConfig(kv_cache_dtype="bfloat16"))
    assert "engine.kv_cache_dtype" in caplog.text
    engine._eos = set()
    try:
        assert engine.describe()["kv_dtype"] == "float32" and engine.numerics() == "fp32"
        assert_all_match_generate(loaded, engine, [("hello world", 8), ("red", 5)])
    finally:
        engine.shutdown()


def test_an_unknown_kv_cache_dtype_is_refused_by_name():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        from_dict({"engine": {"kv_cache_dtype": "float8"}})
