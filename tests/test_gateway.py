"""The gateway over real HTTP, in front of a real Ray cluster with tiny models."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.cluster
MODEL = "tiny-llama"


def chat(url, **body):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_chat_completion_says_who_answered(gateway_url):
    response = chat(gateway_url)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] >= 1
    served = body["rayinfer"]
    assert served["node_label"].startswith("Worker Node #")
    assert served["model"] == MODEL and served["actor_id"]
    assert response.headers["x-request-id"] in body["id"]


def test_request_id_header_is_echoed(gateway_url):
    response = chat(gateway_url, max_tokens=2)
    assert response.headers["x-request-id"]
    mine = httpx.get(f"{gateway_url}/v1/models", headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"


def test_streaming_chat_ends_with_done(gateway_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "red blue"}],
            "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-1]["rayinfer"]["node_label"].startswith("Worker Node #")
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    whole = chat(gateway_url, messages=[{"role": "user", "content": "red blue"}], max_tokens=6)
    assert streamed == whole.json()["choices"][0]["message"]["content"]


def test_text_completion(gateway_url):
    r = httpx.post(f"{gateway_url}/v1/completions", json={
        "model": MODEL, "prompt": "the cat", "max_tokens": 5, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 5


def test_models_and_cluster_views(gateway_url, cluster):
    models = httpx.get(f"{gateway_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    view = httpx.get(f"{gateway_url}/v1/cluster").json()
    roles = [n["role"] for n in view["nodes"]]
    assert roles.count("head") == 1 and roles.count("worker") >= 2
    head = next(n for n in view["nodes"] if n["role"] == "head")
    assert head["label"] == "Head Node" and head["actors"] == 0
    assert head["resources"].get("CPU", 0) == 0
    assert view["totals"]["actors"] == len(view["actors"]) >= 2
    assert {a["node_label"] for a in view["actors"]} >= {"Worker Node #1", "Worker Node #2"}


def test_health_and_metrics(gateway_url):
    health = httpx.get(f"{gateway_url}/health")
    assert health.status_code == 200 and health.json()["ready"] >= 2
    chat(gateway_url, max_tokens=2)
    text = httpx.get(f"{gateway_url}/metrics").text
    for name in ("rayinfer_requests_total", "rayinfer_time_to_first_token_seconds_bucket",
                 "rayinfer_inter_token_latency_seconds_bucket",
                 "rayinfer_e2e_request_latency_seconds_bucket",
                 "rayinfer_generation_tokens_total", "rayinfer_actors",
                 "rayinfer_actor_outstanding_requests"):
        assert name in text, name
    assert 'rayinfer_requests_total{endpoint="/v1/chat/completions",model="tiny-llama",' \
           'status="200"}' in text


BAD_REQUESTS = [
    ("malformed json", "{not json", 400, "not valid JSON"),
    ("no messages", {"model": MODEL}, 400, "messages is required"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("empty content", {"model": MODEL, "messages": [{"role": "user", "content": "  "}]}, 400,
     "empty"),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "role"),
    ("string max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": "5"}, 400, "max_tokens"),
    ("zero max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 10**6}, 400, "context"),
    ("hot temperature", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "temperature": 3}, 400, "temperature"),
    ("top_p zero", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "top_p": 0}, 400, "top_p"),
    ("n=2", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400,
     "n"),
    ("long prompt", {"model": MODEL, "messages": [
        {"role": "user", "content": "hello " * 400}]}, 400, "context"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "gpt-9"),
    ("array body", [1, 2, 3], 400, ""),
]


@pytest.mark.parametrize(("name", "body", "status", "needle"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_clear_errors(gateway_url, name, body, status, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{gateway_url}/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle.lower() in error["message"].lower()
    # ...and the cluster still answers normally afterwards.
    assert chat(gateway_url, max_tokens=2).status_code == 200


def test_concurrent_requests_share_batches(gateway_url, cluster):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: chat(gateway_url, max_tokens=24, temperature=0.8,
                                               seed=i), range(16)))
    assert all(r.status_code == 200 for r in results)
    batch_sizes = [r.json()["rayinfer"]["batch_size"] for r in results]
    assert max(batch_sizes) > 1
    nodes = {r.json()["rayinfer"]["node_label"] for r in results}
    assert len(nodes) == 2, "least-loaded routing should use both workers"


def test_api_key_is_required_when_set(cluster):
    from tests.conftest import Gateway

    secured = Gateway(api_key="s3cret-key")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        url = f"{secured.url}/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret-key"},
                           timeout=60)
        assert right.status_code == 200
        assert httpx.get(f"{secured.url}/health").status_code == 200  # probes stay open
    finally:
        secured.stop()


def test_full_gateway_answers_429_with_retry_after(cluster):
    import concurrent.futures

    from tests.conftest import Gateway

    tight = Gateway(max_in_flight=1)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: chat(tight.url, max_tokens=60), range(6)))
        codes = [r.status_code for r in responses]
        assert 200 in codes and 429 in codes
        limited = next(r for r in responses if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        tight.stop()


def test_head_processes_stay_small(gateway_url):
    view = httpx.get(f"{gateway_url}/v1/cluster").json()
    head = view["head_processes"]
    assert 0 < head["coordinator_rss_bytes"] < 1_000_000_000


def test_load_generator_measures_every_request_over_real_http(gateway_url):
    import asyncio

    from ray_inference.bench.load import run_load
    from ray_inference.bench.prompts import Workload

    work = Workload.make(6, min_tokens=12, max_tokens=16, seed=3)
    result = asyncio.run(run_load(gateway_url, MODEL, concurrency=2, work=work))
    summary = result.summary()
    assert (result.requests, result.errors) == (6, 0), summary["error_samples"]
    assert result.tokens == sum(work.lengths)  # end of sequence is ignored: every token counts
    assert len(result.ttft) == 6 and len(result.ttft_steady) == 4  # each client's first is cold
    assert len(result.itl) == 6 and all(0 < itl < 10 for itl in result.itl)
    assert summary["ttft_steady_p50_s"] <= summary["e2e_p50_s"]
    assert summary["tok_s"] > 0 and summary["req_s"] > 0


def test_bench_http_only_load_tests_a_running_cluster(gateway_url, tmp_path):
    """`rayinfer bench --http-only`: the load generator alone against a real gateway, every
    request counted, nothing run locally; sampled, as users' requests are by default."""
    from click.testing import CliRunner

    from ray_inference.bench.prompts import Workload
    from ray_inference.cli.main import cli

    out = tmp_path / "load.json"
    result = CliRunner().invoke(cli, [
        "bench", "--http-only", "--url", gateway_url, "-m", MODEL, "-c", "2", "-c", "3",
        "--min-tokens", "4", "--max-tokens", "7", "--sequential", "2",
        "--requests-per-client", "2", "--seed", "5", "--temperature", "0.8", "--top-p", "0.9",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["sampling"] == {"temperature": 0.8, "top_p": 0.9}
    assert "sampled at temperature 0.8, top_p 0.9" in result.output
    assert (saved["gateway"], saved["model"], saved["engine_settings"]) == (gateway_url, MODEL,
                                                                            None)
    rows = saved["rows"]
    assert [(r["variant"], r["requests"], r["errors"]) for r in rows] == [
        ("d: full stack over HTTP, 1 clients", 2, 0), ("d: full stack over HTTP, 2 clients", 4, 0),
        ("d: full stack over HTTP, 3 clients", 6, 0)]
    work = Workload.make(6, min_tokens=4, max_tokens=7, seed=5)
    assert [r["tokens"] for r in rows] == [sum(work.lengths[:n]) for n in (2, 4, 6)]
    for row in rows:
        latency = row["latency"]
        assert latency["req_s"] > 0
        for name in ("ttft", "e2e"):
            assert 0 < latency[f"{name}_p50_s"] <= latency[f"{name}_p90_s"] <= latency[
                f"{name}_p99_s"]
    assert f"the full stack only: model {MODEL} at {gateway_url}" in result.output
    assert "x (a)" in result.output and "latency" in result.output
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_http_only_reports_what_the_failed_requests_said(cluster):
    """Past the gateway's limit some requests get 429: they are counted and the table says
    why, and the run still ends with its report."""
    from click.testing import CliRunner

    from ray_inference.cli.main import cli
    from tests.conftest import Gateway

    tight = Gateway(max_in_flight=1)
    try:
        result = CliRunner().invoke(cli, [
            "bench", "--http-only", "--url", tight.url, "-m", MODEL, "-c", "4",
            "--min-tokens", "30", "--max-tokens", "40", "--sequential", "1"])
    finally:
        tight.stop()
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "4 clients" in line).split()
    errors = int(row[-2])  # the last column is the untimed first pass's tok/s
    assert float(row[-1]) > 0
    assert 0 < errors < 8
    assert f"{errors} of 8 requests of d: full stack over HTTP, 4 clients failed, e.g.: " \
        "HTTP 429" in result.output
