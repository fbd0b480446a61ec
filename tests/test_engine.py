"""The engine alone (no Ray, no HTTP) on tiny models of every task type."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time

import pytest
import torch

from ray_inference.config import EngineConfig
from ray_inference.engine import GenerationRequest, causal, create_engine, prepack
from ray_inference.engine.graphs import DecodeGraphs
from ray_inference.engine.text import TextTracker
from ray_inference.engine.types import Chunk
from ray_inference.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError, Overloaded
from ray_inference.models import loader, registry


def load(model_dir, name, sharpen: bool = False, **engine):
    """A tiny model in fp32 and an engine over it; `sharpen` (sharpen_attention) changes the
    weights before the engine packs them."""
    loaded = loader.load(registry.resolve(f"{name}={model_dir / name}"), "float32")
    if sharpen:
        sharpen_attention(loaded.model)
    return loaded, create_engine(loaded, EngineConfig(**engine))


def run(engine, **request) -> list:
    return list(engine.submit(GenerationRequest(**request)))


def reference(loaded, prompt: str, max_new: int) -> list[int]:
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def sharpen_attention(model) -> None:
    """Scale the query and key weights of this test's own model copy: attention gets sharp, so
    a wrong column or position changes the greedy tokens instead of hiding in a near tie."""
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if module_name.endswith(("q_proj", "k_proj", "c_attn")):
                module.weight.mul_(20)


def assert_all_match_generate(loaded, engine, prompts: list[tuple[str, int]]) -> None:
    """Submit every (prompt, max_tokens) at once; each greedy answer must equal generate's."""
    streams = [engine.submit(GenerationRequest(prompt=p, temperature=0, max_tokens=n))
               for p, n in prompts]
    for (prompt, n), stream in zip(prompts, streams, strict=True):
        assert [t for c in stream for t in c.token_ids] == reference(loaded, prompt, n), prompt


def decode_step_inputs():
    """A decode step's query (5 rows, 12 heads), K/V (4 heads, 37 columns) and the columns
    valid per row (about 60%, the last always)."""
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, columns, dim = 5, 12, 4, 37, 16
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    key, value = (torch.randn(rows, kv_heads, columns, dim, generator=generator)
                  for _ in range(2))
    valid = torch.rand(rows, columns, generator=generator) > 0.4
    valid[:, -1] = True
    return query, key, value, valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-folded"])
def test_decode_attention_equals_attention_over_repeated_heads(dtype):
    """Decode steps' grouped-query attention computes what SDPA computes over K/V copied once
    per query head (transformers' path), masked columns included; in bf16 on a CPU with each
    K/V head's query heads folded into the query length. The query comes as packed_attention
    hands it over: a transposed view of the step's queries."""
    from ray_inference.engine.packing import decode_attention

    query, key, value, valid = decode_step_inputs()
    query = query[:, :, 0].transpose(0, 1).contiguous().transpose(0, 1).unsqueeze(2)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    mask = (~valid)[:, None, None, :].to(dtype) * torch.finfo(dtype).min
    group = query.shape[1] // key.shape[1]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(group, 1),
        value.float().repeat_interleave(group, 1), attn_mask=mask.float(),
        scale=0.3).transpose(1, 2)
    out = decode_attention(query, key, value, mask, 0.3)
    assert out.dtype == dtype and not query.is_contiguous()
    tolerance = {} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02}
    torch.testing.assert_close(out.float(), expected, **tolerance)
    # A column the mask hides does not count: changing it changes nothing.
    hidden = (~valid).nonzero()[0]
    value[hidden[0], :, hidden[1]] += 100.0
    torch.testing.assert_close(decode_attention(query, key, value, mask, 0.3), out)


@pytest.mark.parametrize("overlap", [False, True], ids=["settled", "overlapped"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_batched_greedy_matches_one_at_a_time_generate(model_dir, name, overlap):
    loaded, engine = load(model_dir, name, overlap_steps=overlap)
    # Every decode step runs packing.py's grouped-query attention; settled CPU steps as packed
    # steps, overlapped ones (as on a GPU) through the model's own forward pass.
    described = engine.describe()
    assert described["grouped_query_steps"]
    assert described["packed_steps"] is (not overlap)
    engine._eos = set()  # compare raw token streams with generate's
    prompts = ["hello world", "what is the capital of france ?", "red", "the cat is a dog of no"]
    assert_all_match_generate(loaded, engine, [(p, 12) for p in prompts])
    assert engine.stats.max_batch > 1
    engine.shutdown()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def packable(dtype: torch.dtype, kernel: str):
    """`dtype` and a kernel as test parameters, skipped where this CPU build cannot pack it."""
    return pytest.param(dtype, kernel, id=f"{dtype_name(dtype)}-{kernel}", marks=pytest.mark.skipif(
        kernel not in prepack.kernels(dtype),
        reason=f"this CPU build has no packed {dtype} kernels of {kernel}"))


PACKABLE = [packable(torch.bfloat16, "onednn"), packable(torch.float32, "mkl"),
            packable(torch.float32, "onednn")]


def assert_packed_output(dtype: torch.dtype, packed: torch.Tensor, plain: torch.Tensor) -> None:
    """bf16 without a bias: oneDNN runs the same implementation, bit for bit; MKL's packed
    fp32 products sum in their own order, so fp32 agrees within rounding."""
    if dtype == torch.bfloat16:
        assert torch.equal(packed, plain)
    else:
        torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("dtype", "kernel"), PACKABLE)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_packed_linear_weights_give_the_models_own_logits(model_dir, name, dtype, kernel):
    """Every nn.Linear swapped for its packed twin: the model's logits, the untied weights'
    own memory given up, and a second pack changes nothing."""
    loaded = loader.load(registry.resolve(f"{name}={model_dir / name}"), dtype_name(dtype))
    model = loaded.model
    twin = copy.deepcopy(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = loaded.tokenizer("the cat is a dog of no", return_tensors="pt")["input_ids"]
    assert prepack.pack(model, kernel) == len(linears) > 0  # GPT-2: lm_head (blocks: Conv1D)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert prepack.kernel_of(model) == kernel
    assert all(type(m) is prepack.KERNELS[kernel] for m in model.modules()
               if isinstance(m, tuple(prepack.KERNELS.values())))
    assert prepack.pack(model, kernel) == 0
    unpacked = sum(p.numel() for p in twin.parameters())
    untied = sum(m.weight.numel() for m in linears
                 if m.weight is not model.get_input_embeddings().weight)
    assert sum(p.numel() for p in model.parameters()) == unpacked - untied
    assert loaded.describe()["parameters"] == unpacked  # counted at load
    with torch.inference_mode():
        assert_packed_output(dtype, model(ids).logits, twin(ids).logits)


@pytest.mark.parametrize(("dtype", "kernel"), PACKABLE)
def test_linear_layers_with_a_bias_pack_too(dtype, kernel):
    """Llama's projections have no bias, others' (Qwen's q/k/v) do: the packed layer adds it,
    for one row, a batch, more rows than the layout was packed for, and none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                torch.nn.Linear(96, 32)).to(dtype)
    twin = copy.deepcopy(model)
    assert prepack.pack(model, kernel) == 2
    assert all(isinstance(model[i], prepack.KERNELS[kernel]) and model[i].bias is not None
               for i in (0, 2))
    with torch.inference_mode():
        for shape in ((1, 64), (5, 64), (2, 70, 64), (0, 64)):
            x = torch.randn(shape, dtype=dtype)
            out = model(x)
            assert out.shape == (*shape[:-1], 32)
            torch.testing.assert_close(out, twin(x))
        with pytest.raises(RuntimeError):  # the wrong width fails, as with the plain layer
            model(torch.randn(3, 65, dtype=dtype))


@pytest.mark.parametrize(("dtype", "kernel"), PACKABLE)
def test_a_cpu_engine_packs_its_weights_and_answers_as_without(model_dir, dtype, kernel):
    path = registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}")
    answers, packed = {}, {}
    for setting in (kernel, True, False):
        loaded = loader.load(path, dtype_name(dtype))
        engine = create_engine(loaded, EngineConfig(prepack_weights=setting))
        engine._eos = set()
        described = engine.describe()
        packed[setting] = described["prepacked_linears"], described["prepack_kernel"]
        streams = [engine.submit(GenerationRequest(prompt=p, temperature=0, max_tokens=10))
                   for p in ("hello world", "red", "the cat is a dog of no")]
        answers[setting] = [[t for c in s for t in c.token_ids] for s in streams]
        engine.shutdown()
    # 2 layers x 7 projections + lm_head; true packs for a kernel this build has for dtype
    assert packed[kernel] == (15, kernel) and packed[False] == (0, None)
    assert packed[True][0] == 15 and packed[True][1] in prepack.kernels(dtype)
    assert answers[kernel] == answers[True] == answers[False]


@pytest.mark.skipif(prepack.kernels(torch.float32) != ["mkl", "onednn"],
                    reason="this CPU build cannot pack fp32 weights for both MKL and oneDNN")
def test_fp32_weights_are_packed_for_the_kernel_measured_faster(caplog):
    """Where the build has both, `true` takes oneDNN only where it ran the sample in under
    0.9 of MKL's time, and the worker's log says what each took."""
    with caplog.at_level(logging.INFO, logger="ray_inference.engine.prepack"):
        chosen, seconds = prepack.fastest_fp32_kernel(576)
    assert set(seconds) == {"mkl", "onednn"} and all(0 < s < 10 for s in seconds.values())
    assert chosen == ("onednn" if seconds["onednn"] < 0.9 * seconds["mkl"] else "mkl")
    assert f"fp32 weights packed for {chosen}" in caplog.text


@pytest.mark.skipif(not prepack.kernels(torch.bfloat16),
                    reason="this CPU build has no packed bf16 kernels")
def test_a_kernel_that_cannot_hold_the_weights_gives_way_with_a_warning(caplog):
    """MKL has no bf16 path: asked for it, bf16 weights are packed for oneDNN, and the
    warning says so."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="ray_inference.engine.prepack"):
        assert prepack.pack(model, "mkl") == 1
    assert "mkl cannot pack torch.bfloat16 weights in this build; packing them for onednn" \
        in caplog.text
    assert prepack.kernel_of(model) == "onednn"


def test_float16_cpu_weights_stay_as_they_are(model_dir):
    """Neither oneDNN's bf16 path nor MKL's fp32 one takes fp16 weights."""
    assert not prepack.supported(torch.device("cpu"), torch.float16)
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), "float16")
    assert prepack.pack(loaded.model) == 0


def test_requests_join_a_running_batch(model_dir):
    loaded, engine = load(model_dir, "tiny-llama")
    engine._eos = set()
    first = engine.submit(GenerationRequest(prompt="hello", temperature=0, max_tokens=60))
    started = next(iter(first))
    assert started.token_ids
    late = run(engine, prompt="red blue green", temperature=0, max_tokens=5)
    rest = list(first)
    assert late[-1].finish_reason == "length" and rest[-1].finish_reason == "length"
    assert late[-1].batch_size == 2  # it ran beside the long request
    assert [t for c in late for t in c.token_ids] == reference(loaded, "red blue green", 5)
    engine.shutdown()


@pytest.mark.parametrize("admit", [True, False], ids=["between-layers", "at-step-start"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_request_arriving_mid_step_is_prefilled_between_layers(model_dir, name, admit):
    loaded, engine = load(model_dir, name, admit_between_layers=admit, pack_arrivals=False)
    engine._eos = set()
    late: list = []

    def arrive(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not late and hidden.shape[1] == 1:  # inside the first decode step, after layer 0
            late.append(engine.submit(GenerationRequest(prompt="red blue green", temperature=0,
                                                        max_tokens=6)))

    running: list[int] = []  # what load() says at the step's last layer, after the arrival

    def count(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if late and not running and hidden.shape[1] == 1:
            running.append(engine.load()["running"])

    layers = causal._decoder_layers(loaded.model)
    hooks = [layers[0].register_forward_hook(arrive, with_kwargs=True),
             layers[-1].register_forward_hook(count, with_kwargs=True)]
    first = run(engine, prompt="hello world", temperature=0, max_tokens=20)
    for hook in hooks:
        hook.remove()
    # Admitted mid-step, the arrival counts as running before it joins the batch.
    assert running == [2 if admit else 1]
    assert [t for c in first for t in c.token_ids] == reference(loaded, "hello world", 20)
    assert [t for c in late[0] for t in c.token_ids] == reference(loaded, "red blue green", 6)
    assert engine.stats.admitted_between_layers == (1 if admit else 0)
    engine.shutdown()
    assert not loaded.model._forward_hooks and all(
        not layer._forward_hooks for layer in causal._decoder_layers(loaded.model))


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "own-pass"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_arrivals_are_prefilled_inside_the_running_batchs_decode_step(model_dir, name, pack):
    """Requests that arrive while a batch runs ride in its next decode pass: a short prompt,
    one longer than the batch's history (columns move right), one that ends with its first
    token, and prompts whose start the prefix cache holds. Every greedy answer stays generate's."""
    loaded, engine = load(model_dir, name, sharpen=True, pack_arrivals=pack)
    assert engine.describe()["pack_arrivals"] is pack
    engine._eos = set()
    shared = "the cat is a dog of no red blue green hello world " * 3
    # The first two prompts that start alike teach the prefix cache (one of them packed);
    # the next two are packed after the cached start.
    arrivals = [(shared + "what", 5), (shared + "of france ?", 7), (shared + "red", 4),
                ("red", 6), (" ".join(["what is the capital of france ?"] * 5), 8), ("blue", 1)]
    first = engine.submit(GenerationRequest(prompt=shared + "hello", temperature=0,
                                            max_tokens=80))
    got = list(next(iter(first)).token_ids)
    answers = []
    for prompt, n in arrivals:  # one at a time: each has its first token before the next
        stream = engine.submit(GenerationRequest(prompt=prompt, temperature=0, max_tokens=n))
        answers.append((stream, next(iter(stream)).token_ids))
    got += [t for c in first for t in c.token_ids]
    assert got == reference(loaded, shared + "hello", 80)
    for (prompt, n), (stream, start) in zip(arrivals, answers, strict=True):
        assert start + [t for c in stream for t in c.token_ids] == reference(loaded, prompt, n), \
            prompt
    assert engine.load() == {"running": 0, "waiting": 0}
    assert engine.stats.packed_arrivals == (len(arrivals) if pack else 0)
    shared_tokens = len(loaded.tokenizer(shared.strip())["input_ids"]) - 1
    assert engine.stats.prefix_tokens >= 2 * shared_tokens
    engine.shutdown()
    assert loaded.model.config._attn_implementation == "sdpa"


def test_arrivals_are_packed_only_once_the_batch_runs_enough_rows(model_dir):
    """pack_arrivals: 2. An arrival beside one running request gets a prefill of its own (at a
    layer boundary or at the step's start); the next, beside two, rides in a decode step."""
    loaded, engine = load(model_dir, "tiny-llama", sharpen=True, pack_arrivals=2)
    assert engine.describe()["pack_arrivals"] == 2
    engine._eos = set()
    prompts = [("hello world", 200), ("red blue green", 150), ("what is the capital", 6)]
    streams, answers = [], []
    for prompt, n in prompts:  # one at a time: each has its first token before the next
        stream = engine.submit(GenerationRequest(prompt=prompt, temperature=0, max_tokens=n))
        streams.append(stream)
        answers.append(list(next(iter(stream)).token_ids))
        assert engine.stats.packed_arrivals == (1 if len(streams) == 3 else 0)
    for (prompt, n), stream, start in zip(prompts, streams, answers, strict=True):
        assert start + [t for c in stream for t in c.token_ids] == reference(loaded, prompt, n), \
            prompt
    assert engine.stats.packed_arrivals == 1
    engine.shutdown()


@pytest.mark.parametrize(("layer", "within", "joins"), [(0, 0.5, True), (0, 0.4, False),
                                                       (-1, 0.5, False)],
                         ids=["first-half-joins", "past-the-window-waits", "last-layer-waits"])
def test_an_arrival_during_a_steps_first_layers_joins_that_step(model_dir, monkeypatch, layer,
                                                                within, joins):
    """A lean packed step (tiny Llama, two layers): a request that arrives after its first
    layer runs that layer alone and the second inside the step; one that arrives after the
    last layer, or after more layers than JOIN_WITHIN of them, is packed into the next step.
    Every answer stays generate's."""
    monkeypatch.setattr(causal, "JOIN_WITHIN", within)
    loaded, engine = load(model_dir, "tiny-llama", sharpen=True, pack_arrivals=True)
    engine._eos = set()
    late: list = []
    before: list[int] = []  # packed and joined arrivals until then (the first two may be)

    def arrive(module, args, output):
        if not late and engine.stats.steps >= 12:  # the prefill and 11 decode steps done
            before.extend([engine.stats.packed_arrivals, engine.stats.joined_midstep])
            late.append(engine.submit(GenerationRequest(prompt="red blue green", temperature=0,
                                                        max_tokens=6)))

    hook = causal._decoder_layers(loaded.model)[layer].register_forward_hook(arrive)
    # A short request beside the first leaves a slot free: joining never grows the cache.
    short = engine.submit(GenerationRequest(prompt="of france", temperature=0, max_tokens=3))
    first = run(engine, prompt="hello world", temperature=0, max_tokens=40)
    hook.remove()
    chunks = list(late[0])
    assert [t for c in short for t in c.token_ids] == reference(loaded, "of france", 3)
    assert [t for c in first for t in c.token_ids] == reference(loaded, "hello world", 40)
    assert [t for c in chunks for t in c.token_ids] == reference(loaded, "red blue green", 6)
    assert engine.stats.packed_arrivals - before[0] == 1
    assert engine.stats.joined_midstep - before[1] == (1 if joins else 0)
    # Its first token came out of the step it arrived in, or out of the next one.
    assert chunks[0].batch_size == 2
    engine.shutdown()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prompts_that_start_alike_are_prefilled_from_the_prefix_cache(model_dir, name):
    loaded, engine = load(model_dir, name, sharpen=True)
    engine._eos = set()
    shared = "the cat is a dog of no red blue green hello world " * 3
    endings = ["what", "what is the capital", "of france ?", "red", "the cat is a dog"]
    prompts = [shared + ending for ending in endings]
    # Two full prefills teach the cache the shared start; then a batch of three prompts of
    # different lengths is prefilled from it, and one more alone.
    assert_all_match_generate(loaded, engine, [(prompts[0], 5)])
    assert_all_match_generate(loaded, engine, [(prompts[1], 5)])
    assert engine.stats.prefix_tokens == 0
    assert_all_match_generate(loaded, engine, [(p, 8) for p in prompts[2:]])
    shared_tokens = len(loaded.tokenizer(shared.strip())["input_ids"]) - 1
    assert engine.stats.prefix_tokens >= 3 * shared_tokens
    assert_all_match_generate(loaded, engine, [(prompts[3], 6), ("hello world", 6)])
    engine.shutdown()

    _, without = load(model_dir, name, prefix_cache=False)
    for prompt in prompts:
        run(without, prompt=prompt, max_tokens=2)
    assert without.stats.prefix_tokens == 0
    without.shutdown()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_seeded_sampling_is_reproducible_and_per_request(model_dir, top_p):
    _, engine = load(model_dir, "tiny-llama")
    def text(seed):
        return "".join(c.text for c in run(engine, prompt="hello", temperature=1.5, seed=seed,
                                           top_p=top_p, max_tokens=16))
    assert text(7) == text(7)
    assert len({text(s) for s in range(6)}) > 1
    engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True], ids=["settled", "overlapped"])
def test_stop_strings_cut_the_text(model_dir, overlap):
    _, engine = load(model_dir, "tiny-llama", overlap_steps=overlap)
    engine._eos = set()
    free = "".join(c.text for c in run(engine, prompt="hello", temperature=0, max_tokens=20))
    word = free.split()[2]
    chunks = run(engine, prompt="hello", temperature=0, max_tokens=20, stop=[word])
    text = "".join(c.text for c in chunks)
    assert word not in text and free.startswith(text)
    assert chunks[-1].finish_reason == "stop"
    engine.shutdown()


@pytest.mark.parametrize("overlap", [False, True], ids=["settled", "overlapped"])
def test_cancel_frees_the_slot(model_dir, overlap):
    _, engine = load(model_dir, "tiny-llama", overlap_steps=overlap)
    engine._eos = set()
    stream = engine.submit(GenerationRequest(prompt="hello", temperature=0, max_tokens=200,
                                             request_id="gone"))
    next(iter(stream))
    engine.cancel("gone")
    assert list(stream)[-1].finish_reason == "cancelled"
    assert engine.load() == {"running": 0, "waiting": 0}
    engine.shutdown()


def test_limits_are_enforced_up_front(model_dir):
    _, engine = load(model_dir, "tiny-llama", max_queue=1, max_tokens_in_flight=300)
    with pytest.raises(ContextLengthExceeded):
        engine.submit(GenerationRequest(prompt="hello " * 300))
    with pytest.raises(ContextLengthExceeded):
        engine.submit(GenerationRequest(prompt="hello", max_tokens=1000))
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest(prompt="   "))
    gate = threading.Event()
    original = engine.step
    engine.step = lambda: (gate.wait(), original())  # hold the engine so the queue fills
    waiting = engine.submit(GenerationRequest(prompt="hello", max_tokens=2))
    with pytest.raises(Overloaded, match="already waiting"):
        engine.submit(GenerationRequest(prompt="hello", max_tokens=2))
    gate.set()
    assert list(waiting)[-1].finish_reason in ("stop", "length")  # the queued one still runs
    engine.shutdown()


def test_text2text_and_fill_mask(model_dir):
    loaded, engine = load(model_dir, "tiny-t5")
    assert loaded.task == "text2text"
    streams = [engine.submit(GenerationRequest(prompt=p, max_tokens=6)) for p in ("hello", "red blue")]
    finals = [list(s)[-1] for s in streams]
    assert all(f.completion_tokens <= 6 and f.text for f in finals)
    assert max(f.batch_size for f in finals) >= 1
    engine.shutdown()
    loaded, engine = load(model_dir, "tiny-bert")
    assert loaded.task == "fill-mask"
    final = run(engine, prompt="the capital of france is [MASK] .")[-1]
    assert final.text.startswith("the capital of france is") and "[MASK]" not in final.text
    with pytest.raises(InvalidRequest, match="mask token"):
        engine.submit(GenerationRequest(prompt="no mask"))
    engine.shutdown()


class _WordTokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_text_tracker_holds_back_possible_stop_prefixes():
    tracker = TextTracker(_WordTokenizer(["Hel", "lo ", "EN", "D", "x"]), stop=["END"])
    assert tracker.add(0) == "Hel"
    assert tracker.add(1) == "lo "
    assert tracker.add(2) == ""  # "EN" could become "END"
    assert tracker.add(3) == "" and tracker.stopped
    assert tracker.flush() == ""


def test_a_resumed_request_continues_exactly_where_the_answer_was_cut(model_dir):
    _, engine = load(model_dir, "tiny-llama")
    engine._eos = set()
    full = [t for c in run(engine, prompt="hello world the cat", temperature=0, max_tokens=40)
            for t in c.token_ids]
    for cut in (1, 13, 39):
        chunks = run(engine, prompt="hello world the cat", temperature=0, max_tokens=40,
                     resume_ids=full[:cut])
        assert [t for c in chunks for t in c.token_ids] == full[cut:]
        assert chunks[-1].completion_tokens == 40
    engine.shutdown()


def test_text_tracker_resumes_with_the_spacing_of_the_whole_text(model_dir):
    """A resumed request's text continues exactly where the whole answer's decode would."""
    loaded, engine = load(model_dir, "tiny-llama")
    engine.shutdown()
    tokenizer = loaded.tokenizer
    ids = tokenizer("the cat is a dog of no red blue green")["input_ids"]
    for cut in (1, 3, len(ids) - 1):
        tracker = TextTracker(tokenizer, prefix_ids=ids[:cut])
        rest = "".join(tracker.add(i) for i in ids[cut:]) + tracker.flush()
        assert tokenizer.decode(ids[:cut]) + rest == tokenizer.decode(ids)


def test_unknown_and_missing_models_say_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'nonsense'"):
        registry.resolve("nonsense")
    with pytest.raises(ModelLoadError, match="never downloaded"):
        registry.resolve("gpt2-medium")
    with pytest.raises(ModelLoadError, match="does not exist"):
        registry.resolve(f"x={tmp_path / 'missing'}")
    with pytest.raises(ModelLoadError, match=r"neither a config\.json"):
        registry.resolve(f"x={tmp_path}")
    assert registry.resolve("smollm2").gguf_file.endswith(".gguf")


@pytest.mark.parametrize("overlap", [False, True], ids=["settled", "overlapped"])
def test_slots_of_finished_rows_are_reused_without_changing_answers(model_dir, overlap):
    loaded, engine = load(model_dir, "tiny-gpt2", max_batch_size=4, overlap_steps=overlap)
    engine._eos = set()
    prompts = [("hello world", 3), ("red", 40), ("the cat is a dog", 5), ("what is", 30),
               ("blue green red", 7), ("yes no yes", 9), ("one two", 4), ("capital of", 12)]
    assert_all_match_generate(loaded, engine, prompts)
    assert engine.stats.max_batch == 4
    assert engine.load() == {"running": 0, "waiting": 0}
    engine.shutdown()


def held_kv_bytes(engine, within_s: float = 10.0, until=None) -> int:
    """The engine's KV cache bytes, polled until `until(bytes)` holds (the engine thread frees
    or keeps its cache just after a request's last chunk goes out)."""
    deadline = time.monotonic() + within_s
    while True:
        held = engine.describe()["kv_bytes"]
        if until is None or until(held) or time.monotonic() > deadline:
            return held
        time.sleep(0.01)


def test_an_emptied_batch_keeps_its_cache_for_the_next_requests(model_dir):
    """Allocating a CPU cache again after every burst costs page faults (seconds on huge
    pages): the buffers are kept, and rows that take the old slots read nothing of the old
    batch, so the next answers are exact."""
    loaded, engine = load(model_dir, "tiny-llama", sharpen=True, max_batch_size=3,
                          kv_cache_keep_s=60)
    engine._eos = set()
    assert_all_match_generate(loaded, engine, [("the cat is a dog of no", 150), ("red", 40),
                                               ("what is the capital", 90)])
    while not engine._emptied_at:  # the engine thread ends the batch after the last chunk
        time.sleep(0.01)
    cache = engine._kv
    assert held_kv_bytes(engine) == cache.nbytes > 0
    assert_all_match_generate(loaded, engine, [("hello", 20), ("blue green red", 60)])
    assert engine._kv is cache and engine.stats.kv_bytes_peak == cache.nbytes
    engine.shutdown()


@pytest.mark.parametrize("keep_s", [0, 0.3])
def test_an_idle_engine_frees_its_cache_after_kv_cache_keep_s(model_dir, keep_s):
    _, engine = load(model_dir, "tiny-llama", kv_cache_keep_s=keep_s)
    run(engine, prompt="red", temperature=0, max_tokens=5)
    assert held_kv_bytes(engine, until=lambda held: held == 0) == 0
    assert time.monotonic() - engine._emptied_at >= keep_s  # not freed before its time
    # It allocates again for the next request.
    assert len([t for c in run(engine, prompt="red", temperature=0, max_tokens=5)
                for t in c.token_ids]) == 5
    engine.shutdown()


def graph_path(engine) -> DecodeGraphs:
    """Switch a CPU engine to the GPU's decode path, run eagerly: every slot of the row bucket
    over columns [0, bucket), inputs copied into fixed tensors, K/V written at a column held in
    a tensor, one 'graph' per bucket, all dropped when the cache grows."""
    engine._graphs = DecodeGraphs(engine._forward, engine._kv_dtype, capture=False)
    return engine._graphs


def test_the_graph_path_answers_exactly(model_dir):
    loaded, engine = load(model_dir, "tiny-llama", max_batch_size=4, overlap_steps=True)
    graphs = graph_path(engine)
    engine._eos = set()
    prompts = [("hello world", 70), ("what is the capital of france ?", 20), ("red", 90),
               ("the cat is a dog of no", 12), ("a b c", 30)]
    assert_all_match_generate(loaded, engine, prompts)
    assert graphs.captures > 0 and graphs.replays > graphs.captures


def test_the_graph_path_makes_room_for_a_rows_whole_budget_when_it_joins(model_dir):
    """A cache that grows drops every captured graph; so a row's columns are reserved when it
    joins, not one chunk at a time as it decodes, and a second answer like the first
    replays graphs that already exist."""
    _, engine = load(model_dir, "tiny-llama", max_batch_size=4, overlap_steps=True)
    graphs = graph_path(engine)
    engine._eos = set()
    tokens = [t for chunk in run(engine, prompt="red", temperature=0, max_tokens=150)
              for t in chunk.token_ids]
    assert len(tokens) == 150
    # Its columns crossed the 64- and 128-column buckets; had the cache grown on the way, the
    # graphs of those buckets would be gone and captured again now.
    captures = graphs.captures
    assert captures >= 3
    again = run(engine, prompt="red", temperature=0, max_tokens=150)
    assert [t for chunk in again for t in chunk.token_ids] == tokens
    assert graphs.captures == captures


@pytest.mark.parametrize("overlap", [False, True], ids=["settled", "overlapped"])
def test_cache_shifts_and_grows_without_changing_answers(model_dir, overlap):
    """Late joiners with prompts longer than the batch's history (history moves right), long
    answers past the first column chunk (the cache grows) and past the second one while the
    oldest rows are gone (history moves left instead of growing): answers stay exact."""
    loaded, engine = load(model_dir, "tiny-llama", max_batch_size=3, overlap_steps=overlap)
    engine._eos = set()
    long_prompt = " ".join(["the cat is a dog of no"] * 6)
    submitted = {}

    def submit(prompt, n):
        submitted[prompt] = (n, engine.submit(GenerationRequest(prompt=prompt, temperature=0,
                                                                max_tokens=n)))

    submit("hello", 150)
    first = iter(submitted["hello"][1])
    got: list[int] = []

    def wait_for(count):
        while len(got) < count:
            got.extend(next(first).token_ids)

    wait_for(1)
    submit("red", 2)
    submit(long_prompt, 30)
    wait_for(60)
    submit("what is", 120)
    wait_for(140)
    submit("blue green", 120)
    got.extend(t for c in first for t in c.token_ids)
    assert got == reference(loaded, "hello", 150)
    for prompt, (n, stream) in submitted.items():
        if prompt != "hello":
            assert [t for c in stream for t in c.token_ids] == reference(loaded, prompt, n), prompt
    config = loaded.model.config
    per_slot_column = (2 * config.num_hidden_layers * config.num_key_value_heads
                       * (config.hidden_size // config.num_attention_heads) * 4)
    # Columns of rows that left are reused: never more than 256 columns for 3 slots.
    assert 0 < engine.stats.kv_bytes_peak <= 3 * 256 * per_slot_column
    engine.shutdown()


def test_a_burst_is_prefilled_over_several_steps_within_the_budget(model_dir):
    loaded, engine = load(model_dir, "tiny-llama", max_prefill_tokens=4)
    engine._eos = set()
    prompts = ["hello world", "the cat is a dog", "red blue", "what is the capital"]
    assert_all_match_generate(loaded, engine, [(p, 10) for p in prompts])
    # At most 4 prompt tokens per step (a longer prompt goes alone): the first arrival decoded
    # on its own before the others joined.
    assert engine.stats.batch_sizes[1] >= 1 and engine.stats.max_batch == 4
    engine.shutdown()


def test_a_held_chunk_goes_out_with_the_next_hand_over_not_on_a_timer():
    """After a chunk is sent, what arrives within the pause is held until a hand-over comes
    after the pause (the engine hands over once per step), so messages leave as steps end."""
    from ray_inference.engine.base import RequestStream

    async def main() -> list[tuple[float, list[int]]]:
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", loop)
        sent = []

        async def read():
            async for chunk in stream.paced(lambda: 0.05):
                sent.append((loop.time(), chunk.token_ids))

        reader = asyncio.create_task(read())
        start = loop.time()
        for at, chunk in ((0.0, Chunk("r", token_ids=[1])), (0.01, Chunk("r", token_ids=[2])),
                          (0.3, Chunk("r", token_ids=[3])),
                          (0.31, Chunk("r", token_ids=[4], finish_reason="length"))):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            stream.push(chunk)
        await reader
        return [(round(t - start, 2), ids) for t, ids in sent]

    sent = asyncio.run(main())
    # Token 2 waits past the pause (0.05 s) for the hand-over of token 3, then both go out.
    assert [ids for _, ids in sent] == [[1], [2, 3], [4]], sent
    assert sent[1][0] >= 0.3, sent


def test_paced_streams_send_fewer_chunks_and_lose_nothing(model_dir):
    """Under a pause, what is made meanwhile goes out as one chunk; tokens, text and the end
    are the same as when every token is sent at once."""
    _, engine = load(model_dir, "tiny-llama")

    async def read(pause: float) -> list:
        request = GenerationRequest(prompt="the answer is", max_tokens=40, temperature=0,
                                    ignore_eos=True)
        stream = engine.submit(request, asyncio.get_running_loop())
        return [chunk async for chunk in stream.paced(lambda: pause)]

    async def main() -> tuple[list, list]:
        return await read(0.0), await read(0.05)

    try:
        every, paced = asyncio.run(main())
    finally:
        engine.shutdown()
    tokens = [t for c in every for t in c.token_ids]
    assert len(tokens) == 40
    assert [t for c in paced for t in c.token_ids] == tokens
    assert "".join(c.text for c in paced) == "".join(c.text for c in every)
    assert paced[-1].finish_reason == every[-1].finish_reason == "length"
    assert [c.finish_reason for c in paced[:-1]] == [None] * (len(paced) - 1)
    assert len(paced) < len(every), (len(paced), len(every))
