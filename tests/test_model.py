"""The real SmolLM2-135M-Instruct end to end: Ray cluster, gateway, OpenAI client and CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import Gateway, LocalCluster, make_config

pytestmark = [pytest.mark.model, pytest.mark.cluster]
QUESTION = "What is the capital of France?"
RAYINFER = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "rayinfer")


@pytest.fixture(scope="module")
def smollm2_url():
    local = LocalCluster(make_config(["smollm2"]))
    local.add_worker()
    local.add_worker()
    server = Gateway()
    yield server.url
    server.stop()
    local.shutdown()


@pytest.fixture(scope="module")
def client(smollm2_url):
    import openai

    return openai.OpenAI(base_url=f"{smollm2_url}/v1", api_key="unused", max_retries=0)


def test_openai_client_chat_answers_paris_from_a_worker(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=40)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    served = reply.model_extra["rayinfer"]
    assert served["node_label"].startswith("Worker Node #")


def test_openai_client_streaming_and_models(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0,
        max_tokens=40, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert "Paris" in text
    assert [m.id for m in client.models.list()] == ["smollm2"]


def test_openai_client_text_completion(client):
    reply = client.completions.create(model="smollm2", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].text


def test_cli_ask_prints_paris_and_the_worker(smollm2_url):
    done = subprocess.run([RAYINFER, "--url", smollm2_url, "ask", "--temperature", "0", QUESTION],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "Worker Node #" in done.stderr


def test_streamed_text_equals_decoding_the_whole_answer():
    """Detokenization looks at a few tokens at a time; with SmolLM2's byte-level tokenizer the
    pieces must still add up to the full decode (accents, CJK, emoji split across tokens)."""
    import random

    from transformers import AutoTokenizer

    from ray_inference.engine.text import TextTracker
    from ray_inference.models import registry

    source = registry.resolve("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file,
                                              local_files_only=True)
    text = "Héllo wörld! 東京は日本の首都です。 The capital of France is Paris 🇫🇷. x=1+2;"
    rng = random.Random(1)
    ids = tokenizer(text)["input_ids"]
    for sequence in (ids, ids + [rng.randrange(tokenizer.vocab_size) for _ in range(300)]):
        tracker = TextTracker(tokenizer)
        streamed = "".join(tracker.add(i) for i in sequence) + tracker.flush()
        assert streamed == tokenizer.decode(sequence, skip_special_tokens=True)


def test_chat_prompts_from_the_prefix_cache_answer_as_generate_does():
    """SmolLM2's chat template starts every prompt with the same 24 tokens: once the engine
    has seen two prompts, the rest are prefilled from the cached start, alone and batched,
    and every greedy answer must still be generate's (float32, so batching cannot flip a
    near-tie)."""
    from ray_inference.bench.prompts import QUESTIONS
    from ray_inference.config import EngineConfig
    from ray_inference.engine import GenerationRequest, create_engine
    from ray_inference.models import loader, registry

    loaded = loader.load(registry.resolve("smollm2"), "float32")
    engine = create_engine(loaded, EngineConfig())

    def reference(messages) -> list[int]:
        ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
        out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False)
        tokens = out[0, ids["input_ids"].shape[1]:].tolist()
        eos = loaded.tokenizer.eos_token_id  # the engine ends the stream there, without it
        return tokens[:tokens.index(eos)] if eos in tokens else tokens

    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:6]]
    expected = [reference(m) for m in chats]
    answers = [[t for c in engine.submit(GenerationRequest(messages=m, max_tokens=12,
                                                           temperature=0)) for t in c.token_ids]
               for m in chats[:3]]
    streams = [engine.submit(GenerationRequest(messages=m, max_tokens=12, temperature=0))
               for m in chats[3:]]
    answers += [[t for c in s for t in c.token_ids] for s in streams]
    engine.shutdown()
    assert engine.stats.prefix_tokens >= 4 * 24
    assert answers == expected
