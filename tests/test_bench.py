"""The benchmark runs every variant on the real model and reports comparable numbers."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.model


def test_offline_bench_compares_variants_side_by_side(tmp_path):
    from ray_inference.bench.offline import run

    lines = []
    out = tmp_path / "bench.json"
    bars: dict[str, list[int]] = {}  # variant: [requests, requests done]

    def progress(variant: str, requests: int):
        bars[variant] = [requests, 0]

        def tick(done: int) -> None:
            bars[variant][1] += done
        return tick

    rows = run([2], min_tokens=3, max_tokens=5, sequential=1, seed=1, out=out, echo=lines.append,
               requests_per_client=3, progress=progress)
    # Each variant's work runs twice: untimed, then timed.
    assert bars == {name: [count, count] for step, count in
                    (("a", 1), ("c1", 1), ("b2", 6), ("c2", 6))
                    for name in (f"{step} warm-up", step)}
    assert [(r.variant[0], r.concurrency) for r in rows] == [("a", 1), ("c", 1), ("b", 2),
                                                               ("c", 2)]
    assert all(r.tokens > 0 and r.tok_s > 0 and r.first_pass_tok_s > 0 for r in rows)
    assert rows[2].tokens == rows[3].tokens  # the same work through (b) and (c)
    assert rows[2].requests == rows[3].requests == 6  # 2 clients x 3 requests, 3 batches of 2
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 4 and saved["requests_per_client"] == 3
    assert 34 <= saved["prompt_tokens"][0] <= saved["prompt_tokens"][1] <= 38  # bare questions
    assert out.with_suffix(".png").stat().st_size > 1000
    assert any("x (a)" in line for line in lines)
    # TTFT at 2 clients, for all requests and without each client's first, is put against the
    # single-client TTFT of the same variant.
    assert rows[3].ttft_p50_s > 0 and rows[3].ttft_steady_p50_s > 0
    line = next(line for line in lines if "engine, 2 clients" in line).split()
    assert float(line[-5]) > 0 and float(line[-3]) > 0 and float(line[-1]) > 0
    # The engine's rows carry req/s and p50 <= p90 <= p99 of TTFT, inter-token latency and end
    # to end, in the JSON and in a second table.
    for row in saved["rows"]:
        latency = row["latency"]
        if not row["variant"].startswith("c"):
            assert latency is None
            continue
        assert latency["req_s"] > 0
        for name in ("ttft", "itl", "e2e"):
            p50, p90, p99 = (latency[f"{name}_p{q}_s"] for q in (50, 90, 99))
            assert 0 < p50 <= p90 <= p99
        assert latency["itl_p50_s"] < latency["e2e_p50_s"]
    header = lines.index(next(line for line in lines if line.lstrip("\n").startswith("latency")))
    assert [line.split(",")[0] for line in lines[header + 1:header + 3]] == [
        "c: rayinfer engine", "c: rayinfer engine"]


def test_prompts_reach_their_drawn_lengths_in_tokens():
    from ray_inference.bench.prompts import PromptLengthError, Workload, chat_token_counter
    from ray_inference.models import loader, registry

    tokenizer = loader.load(registry.resolve("smollm2")).tokenizer
    count = chat_token_counter(tokenizer)
    bare = Workload.draw(40, (64, 128), 3)
    work = Workload.draw(40, (64, 128), 3, (40, 400), tokenizer)
    lengths = [count(m) for m in work.messages]
    assert all(40 <= n <= 400 for n in lengths) and max(lengths) - min(lengths) > 200
    assert work.lengths == bare.lengths  # the answers' lengths are the bare workload's
    for mine, theirs in zip(work.messages, bare.messages, strict=True):
        assert mine[-1]["content"].endswith(theirs[-1]["content"])  # the question comes last
    # The seed decides: the same prompts again, other prompts for another seed.
    assert Workload.draw(40, (64, 128), 3, (40, 400), tokenizer).messages == work.messages
    assert Workload.draw(40, (64, 128), 4, (40, 400), tokenizer).messages != work.messages
    # One length for all, down to the longest bare question (38 tokens with the template).
    assert {count(m) for m in Workload.draw(40, (64, 128), 3, (38, 38), tokenizer).messages} \
        == {38}
    with pytest.raises(PromptLengthError, match=r"prompts of 30 tokens .* \(38 tokens\)"):
        Workload.draw(40, (64, 128), 3, (30, 60), tokenizer)


@pytest.mark.filterwarnings("error")
def test_the_cli_labels_each_variants_progress_bar(capsys):
    from ray_inference.cli.main import _progress_bar

    tick = _progress_bar("b64", 3)
    tick(1)
    tick(2)
    err = capsys.readouterr().err
    assert "b64" in err
    # Not a terminal here: click draws no bar, only the label, once, however many ticks.
    assert err == " b64\n"


def test_the_gpu_benchmark_passes_every_engine_setting_with_its_default():
    """benchmarks/gpu_engine.py runs where pydantic is not installed, so it spells out
    EngineConfig's fields itself: a field added to the config must be added there too."""
    from benchmarks.gpu_engine import ENGINE_DEFAULTS
    from ray_inference.config import EngineConfig

    assert EngineConfig().model_dump() == ENGINE_DEFAULTS


def test_an_engine_row_names_int8_only_where_the_engine_took_it(tiny_llama):
    """A CPU without fast int8 products declines `quantize: int8` (engine/quantize.py): the
    row then says what ran, not what was asked."""
    from ray_inference.bench.offline import engine_run
    from ray_inference.bench.prompts import Workload
    from ray_inference.engine import quantize
    from ray_inference.models import loader, registry

    loaded = loader.load(registry.resolve(tiny_llama), "float32")
    work = Workload.draw(2, (3, 4), 0, None, loaded.tokenizer)
    row = engine_run(loaded, work, 2, settings={"quantize": "int8"})
    took = quantize.fast(loaded.model.config.hidden_size)
    assert row.variant == f"c: rayinfer engine{' (int8)' if took else ''}, 2 clients"
    assert row.tokens >= 6


def test_the_engine_variant_keeps_one_engine_through_its_warm_up_and_timed_pass(tiny_llama):
    """As the full stack's worker keeps its engine (and its KV cache) between (d)'s passes,
    (c)'s timed pass runs on the engine its warm-up used, which is shut down after it."""
    from ray_inference.bench.offline import EngineVariant
    from ray_inference.bench.prompts import Workload
    from ray_inference.models import loader, registry

    loaded = loader.load(registry.resolve(tiny_llama), "float32")
    work = Workload.draw(4, (3, 4), 0, None, loaded.tokenizer)
    variant = EngineVariant(loaded, work, 2, passes=2)
    first = variant()
    engine = variant._engine
    assert engine is not None and engine.stats.requests == 4
    second = variant()
    assert engine.stats.requests == 8 and variant._engine is None
    assert not engine._thread.is_alive()  # shut down
    assert first.tokens == second.tokens >= 12


def test_engine_rows_name_the_engines_numerics_and_settings_scripts_take_fixed_fields():
    from benchmarks.fixed_settings import parse
    from ray_inference.bench.offline import describe_settings
    from ray_inference.config import EngineConfig

    assert describe_settings(EngineConfig()) == ""
    assert describe_settings(EngineConfig(quantize="int8", kv_cache_dtype="bfloat16")) == \
        "int8, bfloat16 K/V"
    assert describe_settings(EngineConfig(int4_max_rows=4)) == "int4 <= 4 rows"
    assert describe_settings(EngineConfig(int4_max_rows=0)) == "no int4 copies"
    assert parse(["quantize=int8", "openmp_spin_count=null"], "kv_cache_dtype") == {
        "quantize": "int8", "openmp_spin_count": None}
    for bad in ("quantize", "no_such_field=1", "kv_cache_dtype=auto"):
        with pytest.raises(ValueError, match="FIELD=VALUE"):
            parse([bad], "kv_cache_dtype")
