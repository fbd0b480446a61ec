"""The `rayinfer` CLI over real HTTP.

Without a cluster the CLI talks to `FakeGateway`: a real HTTP server on 127.0.0.1 that answers
the documented API (docs/api.md) with canned data, so these tests check the client's
behaviour (settings precedence, streaming, errors and exit codes, rendering, the chat loop)
and nothing of the cluster. Tests marked `cluster` use the `gateway_url` fixture: a real
gateway and cluster with a tiny model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pexpect
import pytest

from tests.conftest import free_port

RAYINFER = str(Path(sys.executable).parent / "rayinfer")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

INFO = {
    "node_label": "Worker Node #1", "hostname": "fakehost", "ip": "10.9.8.7", "node_id": "n1",
    "actor_id": "a1", "model": "tiny", "device": "cpu", "queue_s": 0.01, "generation_s": 0.05,
    "retries": 0,
}
MODELS = {"object": "list", "data": [
    {"id": "tiny", "object": "model", "owned_by": "rayinfer",
     "rayinfer": {"actors": 1, "task": "chat"}},
    {"id": "other", "object": "model", "owned_by": "rayinfer",
     "rayinfer": {"actors": 2, "task": "chat"}},
]}
CLUSTER = {
    "nodes": [
        {"node_id": "n1", "role": "worker", "label": "Worker Node #1", "hostname": "fakehost",
         "ip": "10.9.8.7", "alive": True,
         "resources": {"CPU": 2.0, "GPU": 0.0, "memory": 2 * 2**30}, "actors": 1},
        {"node_id": "n0", "role": "head", "label": "Head Node", "hostname": "fakehead",
         "ip": "10.9.8.1", "alive": True,
         "resources": {"CPU": 1.0, "GPU": 0.0, "memory": 2**30}, "actors": 0},
    ],
    "actors": [
        {"actor_id": "a1b2c3d4e5f6a7b8", "model": "tiny", "device": "cpu", "numerics": "fp32 int8",
         "node_label": "Worker Node #1", "hostname": "fakehost", "ip": "10.9.8.7", "load": 0,
         "state": "ready", "rss_bytes": 300 * 2**20},
    ],
    "totals": {"nodes": 2, "workers": 1, "actors": 1, "cpus": 3.0, "gpus": 0.0,
               "memory_bytes": 3 * 2**30, "in_flight": 0},
}
ERRORS = {  # model -> (status, type, code, extra headers)
    "busy": (429, "rate_limit_error", "queue_full", {"Retry-After": "7"}),
    "nowork": (503, "service_unavailable", "no_worker", {}),
    "broken": (500, "server_error", None, {}),
}


class FakeGateway(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.api_key: str | None = None
        self.models = MODELS  # what GET /v1/models answers
        self.health_status = 200
        self.disconnected = threading.Event()  # a streaming client went away mid-answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def last(self, path: str) -> dict:
        return [r for r in self.requests if r["path"].split("?")[0] == path][-1]


class _Handler(BaseHTTPRequestHandler):
    server: FakeGateway

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: object, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str, code: str | None,
               headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": None,
                                      "code": code}}, headers)

    def _record(self, body: object = None) -> bool:
        self.server.requests.append({"path": self.path, "headers": dict(self.headers),
                                     "body": body})
        if self.path.startswith("/v1/") and self.server.api_key and (
            self.headers.get("Authorization") != f"Bearer {self.server.api_key}"
        ):
            self._error(401, "invalid API key", "invalid_request_error", "invalid_api_key")
            return False
        return True

    def do_GET(self) -> None:
        if not self._record():
            return
        path = self.path.split("?")[0]
        if path == "/v1/models":
            self._send(200, self.server.models)
        elif path == "/v1/cluster":
            self._send(200, CLUSTER)
        elif path == "/v1/events":
            self._send(200, {"events": [
                {"ts": time.time(), "event": "actor_registered", "node_label": "Worker Node #1",
                 "actor_id": "a1b2c3d4", "model": "tiny"},
                {"ts": time.time(), "event": "route", "request_id": "r1",
                 "node_label": "Worker Node #1"},
            ]})
        elif path in ("/health", "/health/live"):
            ok = self.server.health_status == 200
            self._send(self.server.health_status,
                       {"status": "ok"} if ok else {"status": "unavailable",
                                                    "reason": "no worker registered"})
        else:
            self._error(404, "not found", "invalid_request_error", None)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._record(body) or self.path != "/v1/chat/completions":
            return
        model = body["model"]
        if model in ERRORS:
            status, kind, code, headers = ERRORS[model]
            self._error(status, f"fake {code or kind}", kind, code, headers)
            return
        if model not in ("tiny", "other", "slow"):
            self._error(404, f"The model '{model}' does not exist", "invalid_request_error",
                        "model_not_found")
            return
        text = f"echo({len(body['messages'])}): {body['messages'][-1]['content']}"
        if not body.get("stream"):
            self._send(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                "rayinfer": INFO,
            })
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        pieces = [w + " " for w in text.split()] if model != "slow" else ["tick "] * 600
        try:
            for piece in pieces:
                self._chunk({"delta": {"content": piece}, "finish_reason": None})
                if model == "slow":
                    time.sleep(0.05)
            self._chunk({"delta": {}, "finish_reason": "stop"}, rayinfer=INFO)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnected.set()

    def _chunk(self, choice: dict, **extra: object) -> None:
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "tiny",
                 "choices": [{"index": 0, **choice}], **extra}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture
def fake_gateway():
    server = FakeGateway()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(tmp_path):
    """A clean environment: no RAYINFER_* settings, and a HOME without a client config."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("RAYINFER_") and k != "XDG_CONFIG_HOME"}
    clean["HOME"] = str(tmp_path / "home")
    clean["NO_COLOR"] = "1"
    return clean


def run(*args: str, env: dict, input: str | None = None, timeout: float = 30):
    return subprocess.run([RAYINFER, *args], env=env, input=input, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- startup -------------------------------------------------------------------------------


def test_help_lists_commands_and_exit_codes(env):
    result = run("--help", env=env)
    assert result.returncode == 0
    for command in ("ask", "chat", "status", "actors", "models", "logs", "health", "config",
                    "head", "worker"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command
    assert "Exit codes" in result.stdout
    for code in ("3", "4", "5", "6"):
        assert re.search(rf"^\s+{code}\s+\w", result.stdout, re.M), code


@pytest.mark.parametrize("command", ["ask", "chat", "status", "actors", "models", "logs",
                                     "health", "config", "head", "worker", "bench"])
def test_every_command_has_help_with_example(env, command):
    result = run(command, "--help", env=env)
    assert result.returncode == 0
    assert "Example:" in result.stdout and f"rayinfer {command}" in result.stdout


def test_client_does_not_import_ray_or_torch(env, fake_gateway):
    code = f"""
import sys
from ray_inference.cli.main import cli
for args in (["--help"], ["ask", "--help"], ["--url", "{fake_gateway.url}", "ask", "hi"],
             ["--url", "{fake_gateway.url}", "status"], ["health", "--role", "worker"],
             ["bench", "--min-tokens", "9", "--max-tokens", "3"],
             ["bench", "--min-prompt-tokens", "90", "--max-prompt-tokens", "30"],
             ["bench", "--top-p", "0.9"],
             ["bench", "--http-only", "--url", "{fake_gateway.url}", "-m", "nope"],
             ["bench", "--gateway", "{fake_gateway.url}", "-m", "nope"]):
    try:
        cli(args, prog_name="rayinfer")
    except SystemExit:
        pass
heavy = sorted(m for m in ("ray", "torch", "transformers") if m in sys.modules)
print("HEAVY", heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["", "prompt-"])
def test_bench_refuses_an_empty_length_range_by_name(env, kind):
    result = run("bench", f"--min-{kind}tokens", "90", f"--max-{kind}tokens", "30", env=env)
    assert result.returncode == 2
    assert f"--min-{kind}tokens 90 is larger than --max-{kind}tokens 30" in result.stderr


def test_bench_refuses_top_p_without_a_temperature(env):
    result = run("bench", "--top-p", "0.9", env=env)
    assert result.returncode == 2
    assert "--top-p samples, so it needs a --temperature above 0 (0 is greedy)" in result.stderr


def test_bench_checks_the_gateway_before_any_load(env, fake_gateway):
    """A wrong URL, key or model fails in a second, before the benchmark loads anything; the
    API key comes from where the client commands take it."""
    fake_gateway.api_key = "sesame"
    missing_key = run("bench", "--http-only", "--url", fake_gateway.url, env=env)
    assert missing_key.returncode == 4
    assert "API key" in one_line_error(missing_key.stderr)
    wrong_model = run("bench", "--gateway", fake_gateway.url + "/v1", "-m", "nope",
                      env={**env, "RAYINFER_API_KEY": "sesame"})
    assert wrong_model.returncode == 4
    line = one_line_error(wrong_model.stderr)
    assert f"{fake_gateway.url} does not serve model 'nope'; it serves: tiny, other" in line
    url = f"http://127.0.0.1:{free_port()}"
    unreachable = run("bench", "--gateway", url, env=env)
    assert unreachable.returncode == 3
    assert f"cannot connect to {url} (from --gateway)" in one_line_error(unreachable.stderr)


@pytest.mark.parametrize("command", [["ask", "hi"], ["bench", "--http-only"]])
def test_a_gateway_without_models_exits_5(env, fake_gateway, command):
    """`ask` without -m and the benchmark's check share one verdict: nothing served yet."""
    fake_gateway.models = {"object": "list", "data": []}
    result = run("--url", fake_gateway.url, *command, env=env)
    assert result.returncode == 5
    assert "serves no model yet: no worker has registered" in one_line_error(result.stderr)


def test_bench_http_only_refuses_the_local_variants_options(env):
    result = run("bench", "--http-only", "--quantize", "int8", env=env)
    assert result.returncode == 2
    assert "--http-only runs neither" in result.stderr


# ---- connecting ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["ask", "hi"], ["ask", "-m", "tiny", "hi"], ["status"],
                                     ["actors"], ["models"], ["logs"], ["chat"]])
def test_unreachable_gateway_fails_fast_naming_the_url(env, command):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = run("--url", url, *command, env=env, input="", timeout=10)
    assert time.monotonic() - start < 5
    assert result.returncode == 3
    line = one_line_error(result.stderr)
    assert url in line and "cannot connect" in line and "--url" in line


def test_unreachable_url_from_env_names_its_source(env):
    env["RAYINFER_URL"] = f"127.0.0.1:{free_port()}"
    result = run("models", env=env)
    assert result.returncode == 3
    assert f"http://{env['RAYINFER_URL']} (from RAYINFER_URL)" in one_line_error(result.stderr)


def _config(env, *args):
    result = run(*args, "config", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_url_and_key_precedence_flag_env_file_default(env, tmp_path):
    assert _config(env)["url"] == "http://127.0.0.1:8000"
    assert _config(env)["url_source"] == "default"
    assert _config(env)["api_key_source"] == "not set"

    home_file = tmp_path / "home" / ".config" / "rayinfer" / "client.yaml"
    home_file.parent.mkdir(parents=True)
    home_file.write_text("url: http://home-file:8000\napi_key: key-from-home-file\n")
    got = _config(env)
    assert (got["url"], got["url_source"]) == ("http://home-file:8000", str(home_file))
    assert got["api_key"] == "****file" and got["api_key_source"] == str(home_file)

    explicit = tmp_path / "client.yaml"
    explicit.write_text("url: http://explicit-file:8000/v1/\napi_key: key-from-explicit\n")
    env["RAYINFER_CLIENT_CONFIG"] = str(explicit)
    got = _config(env)
    assert got["url"] == "http://explicit-file:8000"  # an OpenAI-style base URL is accepted

    env["RAYINFER_URL"] = "http://env:8000"
    env["RAYINFER_API_KEY"] = "key-from-environment"
    got = _config(env)
    assert (got["url"], got["url_source"]) == ("http://env:8000", "RAYINFER_URL")
    assert got["api_key_source"] == "RAYINFER_API_KEY"

    got = _config(env, "--url", "http://group-flag:8000", "--api-key", "k" * 16)
    assert (got["url"], got["url_source"]) == ("http://group-flag:8000", "--url")
    assert got["api_key_source"] == "--api-key"
    # A command's own --url wins over the group's.
    result = run("--url", "http://group:1", "config", "--url", "cmd:2", "--json", env=env)
    assert json.loads(result.stdout)["url"] == "http://cmd:2"


def test_key_and_url_reach_the_server(env, fake_gateway, tmp_path):
    fake_gateway.api_key = "secret-from-file"
    config = tmp_path / "client.yaml"
    config.write_text(f"url: {fake_gateway.url}\napi_key: secret-from-file\n")
    env["RAYINFER_CLIENT_CONFIG"] = str(config)
    assert run("models", env=env).returncode == 0
    assert fake_gateway.last("/v1/models")["headers"]["Authorization"] == "Bearer secret-from-file"

    env["RAYINFER_API_KEY"] = "secret-from-env"
    fake_gateway.api_key = "secret-from-env"
    assert run("models", env=env).returncode == 0
    assert fake_gateway.last("/v1/models")["headers"]["Authorization"] == "Bearer secret-from-env"

    fake_gateway.api_key = "secret-from-flag"
    assert run("models", "--api-key", "secret-from-flag", env=env).returncode == 0
    assert fake_gateway.last("/v1/models")["headers"]["Authorization"] == "Bearer secret-from-flag"


def test_missing_or_wrong_key_says_what_to_set(env, fake_gateway):
    fake_gateway.api_key = "right"
    result = run("--url", fake_gateway.url, "ask", "-m", "tiny", "hi", env=env)
    assert result.returncode == 4
    assert "RAYINFER_API_KEY" in one_line_error(result.stderr)
    result = run("--url", fake_gateway.url, "--api-key", "wrong", "status", env=env)
    assert result.returncode == 4
    assert "refused the API key" in one_line_error(result.stderr)


@pytest.mark.parametrize("content", ["url: [unclosed", "- a list", "url: x\nmodel: y\n",
                                     "url: 8000\n"])
def test_bad_client_config_is_a_usage_error(env, tmp_path, content):
    config = tmp_path / "client.yaml"
    config.write_text(content)
    env["RAYINFER_CLIENT_CONFIG"] = str(config)
    result = run("models", env=env)
    assert result.returncode == 2
    assert str(config) in one_line_error(result.stderr)


def test_missing_explicit_client_config_is_a_usage_error(env, tmp_path):
    env["RAYINFER_CLIENT_CONFIG"] = str(tmp_path / "nope.yaml")
    result = run("models", env=env)
    assert result.returncode == 2 and "nope.yaml" in one_line_error(result.stderr)


# ---- asking --------------------------------------------------------------------------------


def test_ask_prints_answer_and_who_answered(env, fake_gateway):
    result = run("--url", fake_gateway.url, "ask", "What is Ray?", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo(1): What is Ray?\n"  # piped: only the answer on stdout
    assert not ANSI.search(result.stdout + result.stderr)
    info = result.stderr
    for text in ("Worker Node #1", "fakehost", "10.9.8.7", "tiny on cpu", "0.05s",
                 "0 retries"):
        assert text in info, info
    body = fake_gateway.last("/v1/chat/completions")["body"]
    assert body["model"] == "tiny"  # the server's first model when -m is not given
    assert body["stream"] is False


def test_ask_streams_on_request_and_sends_options(env, fake_gateway):
    result = run("--url", fake_gateway.url, "ask", "--stream", "-m", "other", "-s", "Be brief.",
                 "--max-tokens", "8", "--temperature", "0", "-o", "seed", "3", "-o", "stop",
                 "END", "Count to three", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["echo(2):", "Count", "to", "three"]
    assert "Worker Node #1" in result.stderr
    body = fake_gateway.last("/v1/chat/completions")["body"]
    assert body["stream"] is True and body["model"] == "other"
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["max_tokens"], body["temperature"], body["seed"], body["stop"]) == (
        8, 0, 3, "END")


def test_ask_reads_stdin_and_quiet_prints_only_the_answer(env, fake_gateway):
    result = run("--url", fake_gateway.url, "ask", "-q", "-", input="from stdin\n", env=env)
    assert result.returncode == 0
    assert result.stdout == "echo(1): from stdin\n" and result.stderr == ""


def test_ask_json_is_the_raw_response(env, fake_gateway):
    result = run("--url", fake_gateway.url, "ask", "--json", "hi", env=env)
    assert result.returncode == 0
    body = json.loads(result.stdout)
    assert body["rayinfer"]["node_label"] == "Worker Node #1"
    assert body["choices"][0]["message"]["content"] == "echo(1): hi"


@pytest.mark.parametrize(("model", "code", "says"), [
    ("busy", 6, "retry after 7s"),
    ("nowork", 5, "no worker available"),
    ("missing", 4, "served: tiny, other"),
    ("broken", 1, "the gateway failed (500)"),
])
@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_ask_errors_have_their_exit_code(env, fake_gateway, model, code, says, stream):
    result = run("--url", fake_gateway.url, "ask", stream, "-m", model, "hi", env=env)
    assert result.returncode == code
    assert says in one_line_error(result.stderr)


def test_ask_rejects_empty_prompt(env, fake_gateway):
    assert run("--url", fake_gateway.url, "ask", "-", input="  \n", env=env).returncode == 2
    assert run("--url", fake_gateway.url, "ask", "--temperature", "3", "x", env=env).returncode == 2


def test_not_a_gateway(env, fake_gateway):
    result = run("--url", fake_gateway.url + "/elsewhere", "models", env=env)
    assert result.returncode == 4
    assert "is that URL a rayinfer gateway" in one_line_error(result.stderr)


# ---- watching ------------------------------------------------------------------------------


def test_status_shows_nodes_and_actors(env, fake_gateway):
    result = run("--url", fake_gateway.url, "status", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "2 nodes (1 worker), 1 actor, 3 CPUs, 0 GPUs, 3.0 GiB memory" in lines[0]
    head = next(i for i, line in enumerate(lines) if line.startswith("Head Node"))
    worker = next(i for i, line in enumerate(lines) if line.startswith("Worker Node #1"))
    assert head < worker  # head first, whatever order the server sends
    assert re.search(r"Worker Node #1\s+fakehost\s+10\.9\.8\.7\s+alive\s+1\s+2\s+0\s+2\.0 GiB",
                     result.stdout)
    assert re.search(r"a1b2c3d4e5f6\s+tiny\s+cpu fp32 int8\s+Worker Node #1\s+fakehost\s+"
                     r"10\.9\.8\.7\s+ready\s+0\s+300\.0 MiB", result.stdout)
    assert not ANSI.search(result.stdout)


def test_actors_models_logs(env, fake_gateway):
    actors = run("--url", fake_gateway.url, "actors", env=env)
    assert actors.returncode == 0 and "Worker Node #1" in actors.stdout
    models = run("--url", fake_gateway.url, "models", env=env)
    assert re.search(r"^other\s+2\s+chat$", models.stdout, re.M)
    logs = run("--url", fake_gateway.url, "logs", "-n", "5", env=env)
    assert re.search(r"^\d\d:\d\d:\d\d  actor_registered  node_label=Worker Node #1 "
                     r"actor_id=a1b2c3d4 model=tiny$", logs.stdout, re.M), logs.stdout
    assert re.search(r"  route +  request_id=r1", logs.stdout)
    assert fake_gateway.last("/v1/events")["path"].endswith("limit=5")


@pytest.mark.parametrize(("command", "check"), [
    ("status", lambda d: d["totals"]["workers"] == 1),
    ("actors", lambda d: d[0]["node_label"] == "Worker Node #1"),
    ("models", lambda d: d["data"][0]["id"] == "tiny"),
    ("logs", lambda d: d[0]["event"] == "actor_registered"),
])
def test_json_output(env, fake_gateway, command, check):
    result = run("--url", fake_gateway.url, command, "--json", env=env)
    assert result.returncode == 0
    assert check(json.loads(result.stdout))


# ---- health --------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [["--role", "worker", "--raylet-port"],
                                  ["--role", "head", "--port"]])
def test_health_of_a_closed_local_port_fails_fast(env, role):
    port = str(free_port())
    start = time.monotonic()
    result = run("health", *role, port, env=env, timeout=10)
    assert time.monotonic() - start < 3
    assert result.returncode == 1
    assert "unhealthy" in result.stdout and port in result.stdout


def test_health_follows_the_gateway(env, fake_gateway):
    assert run("--url", fake_gateway.url, "health", env=env).returncode == 0
    port = fake_gateway.url.rsplit(":", 1)[1]
    head = run("health", "--role", "head", "--port", port, "--json", env=env)
    assert head.returncode == 0 and json.loads(head.stdout)["healthy"] is True
    fake_gateway.health_status = 503
    result = run("--url", fake_gateway.url, "health", env=env)
    assert result.returncode == 1 and "no worker registered" in result.stdout


# ---- chat ----------------------------------------------------------------------------------

PROMPT = r"rayinfer \([^)]+\) \[\d+\]> "


def _at_a_terminal() -> None:
    """Ctrl-C as at a terminal: a suite started in the background (`make test &`) inherits
    SIGINT ignored, which a spawned CLI would keep."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(env, url, *args):
    child = pexpect.spawn(RAYINFER, ["--url", url, "chat", *args], env=env, encoding="utf-8",
                          timeout=20, dimensions=(40, 200), preexec_fn=_at_a_terminal)
    child.expect(PROMPT)
    return child


def test_chat_commands_history_and_clean_exit(env, fake_gateway):
    child = spawn_chat(env, fake_gateway.url)
    child.sendline("status")
    child.expect(r"Head Node\s+fakehead")
    child.expect(r"Worker Node #1\s+fakehost\s+10\.9\.8\.7")
    child.expect(PROMPT)
    child.sendline("actors")
    child.expect(r"a1b2c3d4e5f6\s+tiny")
    child.expect(PROMPT)
    child.sendline("logs 3")
    child.expect("actor_registered")
    child.expect(PROMPT)
    child.sendline("What is Ray?")
    child.expect(r"echo\(1\): What is Ray\?")
    child.expect(r"answered by Worker Node #1 . fakehost \(10\.9\.8\.7\)")
    child.expect(PROMPT)
    child.sendline("And then?")
    child.expect(r"echo\(3\): And then\?")  # the first question and answer went along
    child.expect(PROMPT)
    child.sendline("test")
    child.expect(r"echo\(1\): What is artificial intelligence")
    child.expect(PROMPT)
    child.sendline("clear")
    child.expect("Conversation cleared")
    child.sendline("Fresh start")
    child.expect(r"echo\(1\): Fresh start")
    child.sendline("help")
    child.expect("quit, exit")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_errors_keep_the_session(env, fake_gateway):
    child = spawn_chat(env, fake_gateway.url, "-m", "busy")
    child.sendline("hello")
    child.expect("Error: the cluster is busy")
    child.expect(PROMPT)
    child.sendline("models")
    child.expect(r"tiny\s+1\s+chat")
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_cancels_the_answer_and_ctrl_d_leaves(env, fake_gateway):
    child = spawn_chat(env, fake_gateway.url, "-m", "slow")
    child.sendline("go")
    child.expect("tick tick tick")
    child.sendintr()
    child.expect(r"\(cancelled\)")
    child.expect(PROMPT)
    assert fake_gateway.disconnected.wait(10), "the stream was not closed"
    child.sendintr()  # at the prompt: a fresh prompt, not an exit
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ask_ctrl_c_exits_130(env, fake_gateway):
    child = pexpect.spawn(RAYINFER, ["--url", fake_gateway.url, "ask", "-m", "slow", "go"], env=env,
                          encoding="utf-8", timeout=20, preexec_fn=_at_a_terminal)
    child.expect("tick tick")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in child.before


# ---- against a real cluster (the gateway_url fixture comes from tests/conftest.py) ----------


@pytest.mark.cluster
def test_cluster_ask(env, gateway_url):
    result = run("--url", gateway_url, "ask", "--max-tokens", "16", "--temperature", "0",
                 "hello world", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    # The tiny random model's tokens may all be special (decoded to ""), so count them instead;
    # tests/test_model.py checks the text of a real answer.
    assert re.search(r"· 16 tokens", result.stderr), result.stderr
    assert "Worker Node #" in result.stderr
    assert re.search(r"\(\d+\.\d+\.\d+\.\d+\)", result.stderr)  # the worker's IP


@pytest.mark.cluster
def test_cluster_ask_stream_and_json(env, gateway_url):
    result = run("--url", gateway_url, "ask", "--stream", "--max-tokens", "8", "Hi", env=env,
                 timeout=300)
    assert result.returncode == 0 and "Worker Node #" in result.stderr
    result = run("--url", gateway_url, "ask", "--json", "--max-tokens", "8", "Hi", env=env,
                 timeout=300)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["choices"][0]["message"]["content"] is not None
    assert body["rayinfer"]["node_label"].startswith("Worker Node #")


@pytest.mark.cluster
def test_cluster_status_actors_models(env, gateway_url):
    status = run("--url", gateway_url, "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "Head Node" in status.stdout and "Worker Node #1" in status.stdout
    actors = json.loads(run("--url", gateway_url, "actors", "--json", env=env).stdout)
    assert actors and all(a["node_label"].startswith("Worker Node #") for a in actors)
    # The cluster's defaults: the model's own dtype, no int8 layers, the KV cache alike.
    assert all(a["numerics"] in ("fp32", "bf16") for a in actors)
    models = run("--url", gateway_url, "models", env=env)
    assert models.returncode == 0 and actors[0]["model"] in models.stdout
    assert run("--url", gateway_url, "health", env=env).returncode == 0


@pytest.mark.cluster
def test_cluster_chat_session(env, gateway_url):
    child = spawn_chat(env, gateway_url, "--max-tokens", "16")
    child.timeout = 300
    child.sendline("status")
    child.expect(r"Worker Node #1\s+\S+\s+\d+\.\d+\.\d+\.\d+\s+alive")
    child.expect(PROMPT)
    child.sendline("actors")
    child.expect("Worker Node #1")
    child.expect(PROMPT)
    child.sendline("logs")
    child.expect(PROMPT)
    child.sendline("What is the capital of France?")
    child.expect(r"answered by Worker Node #\d+")
    child.expect(PROMPT)
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
