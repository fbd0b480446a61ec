"""A `rayinfer head` and `rayinfer worker`s on this machine, for benchmarks: the head's Ray
ports 26379-26450 and its gateway on 127.0.0.1:28000, worker N's on 127.0.0.(N + 1) from
26380 + 100 N (nothing else may use them meanwhile)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from ray_inference.cli.client import probe

GATEWAY = 28000
URL = f"http://127.0.0.1:{GATEWAY}"
PORTS = {"node_manager": 26380, "object_manager": 26381, "runtime_env_agent": 26382,
         "dashboard_agent_grpc": 26383, "dashboard_agent_http": 26384, "metrics_export": 26385,
         "client_server": 26386, "min_worker_port": 26400, "max_worker_port": 26450}
RAYINFER = Path(sys.executable).with_name("rayinfer")


def _launch(directory: Path, name: str, role: str, config: dict, *args: str) -> subprocess.Popen:
    """`rayinfer ROLE` with this config, as directory/NAME.yaml, logging to NAME.log."""
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(directory / f"{name}.log", "w") as log:
        return subprocess.Popen([str(RAYINFER), role, "--config", str(path), *args], stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def wait_ready(process: subprocess.Popen, ready, what: str, log: Path, timeout_s: float) -> None:
    """Until `ready()` says so; fails with the end of `log` if the process exits first or
    `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}")
        time.sleep(1)


def start_head(directory: Path, **head: object) -> subprocess.Popen:
    """A head with these `head:` settings, once its gateway answers."""
    process = _launch(directory, "head", "head", {"ports": PORTS, "head": {
        "ray_port": 26379, "node_ip": "127.0.0.1", "gateway_port": GATEWAY, **head}})
    wait_ready(process, lambda: probe(f"{URL}/health/live", 2)[0], "the head",
               directory / "head.log", 120)
    return process


def start_worker(directory: Path, engine: dict, index: int = 1, num_cpus: int | None = None,
                 **worker: object) -> subprocess.Popen:
    """Worker `index` (1, 2, ...) with `num_cpus` cores (default: every core of this machine)
    and these `engine:` settings, once the gateway lists `index` ready actors (start workers
    one at a time: two nodes starting at once on two cores can miss Ray's start-up timeout)."""
    process = _launch(directory, f"worker{index}", "worker", {
        "ports": {name: port + 100 * index for name, port in PORTS.items()},
        "logging": {"log_prompts": False, "level": "WARNING"}, "engine": engine,
        "worker": {"node_ip": f"127.0.0.{index + 1}", "num_cpus": num_cpus or os.cpu_count(),
                   "models": ["smollm2"], **worker}}, "--head", "127.0.0.1:26379")

    def ready() -> bool:
        body = probe(f"{URL}/v1/cluster", 5)[2]
        actors = body.get("actors") or [] if isinstance(body, dict) else []
        return sum(a.get("state") == "ready" for a in actors) >= index

    wait_ready(process, ready, f"worker {index}", directory / f"worker{index}.log", 600)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=180)


@contextlib.contextmanager
def head_and_worker(directory: Path, engine: dict) -> Iterator[str]:
    """A head and one worker with every core and these `engine:` settings, for the `with`
    block (the gateway's URL); both are stopped after it, the worker first."""
    with contextlib.ExitStack() as started:  # stops them in reverse order
        started.callback(stop, start_head(directory))
        started.callback(stop, start_worker(directory, engine))
        yield URL
