"""`rayinfer head` plus two `rayinfer worker` processes on this machine, as a user runs them.

Each node advertises its own loopback address (127.0.0.1 head, 127.0.0.2/3 workers) and its
own block of ports, so three Ray nodes share one host.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ray_inference.bench.memory import command, maps_library, process_tree, rss_pss
from ray_inference.node.ray_process import running
from tests.conftest import free_port

pytestmark = pytest.mark.cluster
RAYINFER = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "rayinfer")


def port_block() -> dict[str, int]:
    """Every Ray port left to Ray (0) but the one it would otherwise fix for every node on a
    host (the dashboard agent's HTTP port), so three nodes share this machine."""
    ports = dict.fromkeys(["node_manager", "object_manager", "runtime_env_agent",
                           "dashboard_agent_grpc", "metrics_export", "client_server",
                           "min_worker_port", "max_worker_port"], 0)
    ports["dashboard_agent_http"] = free_port()
    return ports


def write_config(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def processes(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("nodes")
    gcs, gateway = free_port(), free_port()
    head_cfg = write_config(folder / "head.yaml", {
        "ports": port_block(),
        "head": {"ray_port": gcs, "node_ip": "127.0.0.1", "gateway_port": gateway},
    })
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started: list[subprocess.Popen] = []

    def launch(name: str, *args: str) -> subprocess.Popen:
        log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([RAYINFER, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = folder / f"{name}.log"
        started.append(proc)
        return proc

    url = f"http://127.0.0.1:{gateway}"
    try:
        head = launch("head", "head", "--config", head_cfg)
        wait_until(lambda: httpx.get(f"{url}/health/live").status_code == 200, 90, "the head")
        workers = []
        for i in (1, 2):
            cfg = write_config(folder / f"worker{i}.yaml", {
                "ports": port_block(),
                "worker": {"node_ip": f"127.0.0.{i + 1}", "num_cpus": 1, "models": [tiny_llama],
                           "register_interval_s": 1, "drain_timeout_s": 60},
            })
            workers.append(launch(f"worker{i}", "worker", "--config", cfg,
                                  "--head", f"127.0.0.1:{gcs}"))
            # One at a time: two raylets starting together can pick the same free port.
            wait_until(lambda i=i: httpx.get(f"{url}/health").json().get("ready") == i, 240,
                       f"worker {i} to register")
        yield {"url": url, "head": head, "workers": workers, "ray": f"127.0.0.1:{gcs}"}
    except AssertionError:
        for proc in started:
            print(f"--- {proc.log_path.name} (exit {proc.poll()})")
            print(proc.log_path.read_text()[-3000:])
        raise
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(started):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def ask(url: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": max_tokens, "temperature": 0})


def test_the_heads_banner_gives_the_address_workers_join(processes):
    """The head advertises 127.0.0.1 (`head.node_ip`); its banner printed this machine's
    default address instead, which a worker could not have joined."""
    banner = processes["head"].log_path.read_text()
    assert f"rayinfer worker --head {processes['ray']}" in banner


def test_cli_ask_is_answered_by_a_worker_process(processes):
    done = subprocess.run([RAYINFER, "--url", processes["url"], "ask", "-m", "tiny-llama",
                           "--max-tokens", "6", "hello world"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Worker Node #" in done.stderr
    view = httpx.get(f"{processes['url']}/v1/cluster").json()
    head = next(n for n in view["nodes"] if n["role"] == "head")
    assert head["actors"] == 0 and head["resources"].get("CPU", 0) == 0
    assert {a["ip"] for a in view["actors"]} == {"127.0.0.2", "127.0.0.3"}


def test_the_cluster_view_shows_each_actors_current_rss(processes):
    """`rayinfer status` and `rayinfer actors` print it: each worker renews its actors'
    registration (every second here) with their RSS as of then."""
    for _ in range(2):
        assert ask(processes["url"]).status_code == 200
    time.sleep(2)  # a renewal after the answers
    actors = httpx.get(f"{processes['url']}/v1/cluster").json()["actors"]
    assert len(actors) == 2
    for actor in actors:
        now = rss_pss(actor["pid"])[0]  # the actor's process is on this machine
        assert actor["rss_bytes"] > 100 * 2**20  # torch and a model
        assert abs(actor["rss_bytes"] - now) < 0.1 * now


def test_the_heads_processes_never_load_torch(processes):
    """The head only routes: its gateway and coordinator handle the inference actors' handles
    and chunks, yet never load torch (150-200 MB each when they did)."""
    for _ in range(4):
        assert ask(processes["url"]).status_code == 200
    tree = process_tree(processes["head"].pid)
    assert len(tree) > 3  # the gateway, the Ray head's processes, the coordinator
    assert [command(pid) for pid in tree if maps_library(pid, "libtorch")] == []
    # ... while each worker's model actor does.
    assert any(maps_library(pid, "libtorch") for pid in process_tree(processes["workers"][0].pid))


def test_the_head_runs_without_rays_dashboard_modules_or_autoscaler_monitor(processes):
    """By default the head leaves out what rayinfer never uses: the dashboard's module processes
    (about 89 MiB each) and the autoscaler monitor."""
    commands = [command(pid) for pid in process_tree(processes["head"].pid)]
    assert any("gcs_server" in c for c in commands)  # the Ray head itself runs
    assert [c for c in commands if "ray-dashboard-" in c] == []
    assert [c for c in commands if "/autoscaler/" in c and "monitor.py" in c] == []


def test_inference_actors_start_with_the_configured_openmp_spin_count(processes):
    """`engine.openmp_spin_count` (default 3,000,000) reaches the model actor's process, where
    libgomp reads it at start-up; the worker's own processes keep the environment they had."""
    tree = process_tree(processes["workers"][1].pid)
    actors = [pid for pid in tree if command(pid).startswith("ray::InferenceActor")]
    assert actors
    for pid in tree:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile (Ray starts and stops idle workers)
            continue
        assert (b"GOMP_SPINCOUNT=3000000" in environ) == (pid in actors), command(pid)


def test_a_worker_waiting_for_a_coordinator_stops_on_sigterm(processes, tmp_path, tiny_llama):
    """A worker whose coordinator never appears (here: another namespace than the head's)
    waits for it, logging; a SIGTERM meanwhile used to be ignored for good. Now it ends the
    start, and the worker's Ray node and actor with it."""
    config = write_config(tmp_path / "worker.yaml", {
        "namespace": "not-the-heads", "ports": port_block(),
        "worker": {"node_ip": "127.0.0.4", "num_cpus": 1, "models": [tiny_llama]}})
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([RAYINFER, "worker", "--config", config, "--head",
                                   processes["ray"]], stdout=log,
                                  stderr=subprocess.STDOUT,
                                  env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        wait_until(lambda: "waiting for the coordinator" in log_path.read_text(), 180,
                   "the worker to wait for a coordinator")
        tree = process_tree(worker.pid)
        assert len(tree) > 4  # rayinfer, ray start, its raylet and agents, the actor
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log_path.read_text()[-2000:]
    finally:
        worker.kill()
    assert "stopped by SIGTERM while starting" in log_path.read_text()
    deadline = time.monotonic() + 15
    while (left := [pid for pid in tree if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [command(pid) for pid in left]


def test_sigterm_drains_a_worker_without_failures(processes):
    victim = processes["workers"][0]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, processes["url"], 60) for _ in range(16)]
        time.sleep(1.0)
        victim.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 16
    assert victim.wait(90) == 0
    output = victim.log_path.read_text()
    assert "drained" in output and "abandoned=0" in output
    health = httpx.get(f"{processes['url']}/health").json()
    assert health["ready"] == 1
    assert ask(processes["url"]).status_code == 200


def test_a_head_and_worker_stopped_together_leave_no_process_behind(processes):
    """Last in this module: it stops the rest of the cluster. The worker's Ray agents used to
    outlive everything else by about a minute when its head went away at the same moment."""
    nodes = [processes["workers"][1], processes["head"]]
    tree = {pid for node in nodes for pid in process_tree(node.pid)}
    assert len(tree) > 8  # rayinfer, ray start, the GCS, raylets, agents, actors
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    for node in nodes:
        node.wait(120)
    deadline = time.monotonic() + 15
    while (left := [pid for pid in tree if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [command(pid) for pid in left]
