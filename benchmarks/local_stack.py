"""A `rayinfer head` and `rayinfer worker` on this machine, for benchmarks that restart them
with different settings: the head's Ray ports 26379-26450 and its gateway on 127.0.0.1:28000,
the worker's on 127.0.0.2 from 26480 (nothing else may use them meanwhile)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ray_inference.cli.client import probe

GATEWAY = 28000
URL = f"http://127.0.0.1:{GATEWAY}"
PORTS = {"node_manager": 26380, "object_manager": 26381, "runtime_env_agent": 26382,
         "dashboard_agent_grpc": 26383, "dashboard_agent_http": 26384, "metrics_export": 26385,
         "client_server": 26386, "min_worker_port": 26400, "max_worker_port": 26450}
WORKER_PORTS = {name: port + 100 for name, port in PORTS.items()}
RAYINFER = Path(sys.executable).with_name("rayinfer")


def _launch(directory: Path, role: str, config: dict, *args: str) -> subprocess.Popen:
    path = directory / f"{role}.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(directory / f"{role}.log", "w") as log:
        return subprocess.Popen([str(RAYINFER), role, "--config", str(path), *args], stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _wait(process: subprocess.Popen, ready, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}")
        time.sleep(1)


def start_head(directory: Path, **head: object) -> subprocess.Popen:
    """A head with these `head:` settings, once its gateway answers."""
    process = _launch(directory, "head", {"ports": PORTS, "head": {
        "ray_port": 26379, "node_ip": "127.0.0.1", "gateway_port": GATEWAY, **head}})
    _wait(process, lambda: probe(f"{URL}/health/live", 2)[0], "the head", directory / "head.log",
          120)
    return process


def start_worker(directory: Path, engine: dict, **worker: object) -> subprocess.Popen:
    """One worker with every core of this machine and these `engine:` settings, once its
    actors have registered."""
    process = _launch(directory, "worker", {
        "ports": WORKER_PORTS, "logging": {"log_prompts": False, "level": "WARNING"},
        "engine": engine,
        "worker": {"node_ip": "127.0.0.2", "num_cpus": os.cpu_count(), "models": ["smollm2"],
                   **worker}}, "--head", "127.0.0.1:26379")
    # /health answers 200 once an inference actor has registered ready.
    _wait(process, lambda: probe(f"{URL}/health", 5)[0], "the worker", directory / "worker.log",
          600)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=180)
