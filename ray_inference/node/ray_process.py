"""Start this machine's Ray node with `ray start`, every port pinned from the config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from ray_inference import HEAD_RESOURCE
from ray_inference.config import Config
from ray_inference.errors import RayInferError

# Token auth needs a token on every node; rayinfer keeps Ray's ports inside the cluster's own
# network instead (firewall / private bridge). Set RAY_AUTH_MODE=token yourself to add it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _ray_binary() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.path.exists(beside) else (shutil.which("ray") or "ray")


def _port_args(config: Config) -> list[str]:
    ports = config.ports
    pairs = {
        "--node-manager-port": ports.node_manager,
        "--object-manager-port": ports.object_manager,
        "--runtime-env-agent-port": ports.runtime_env_agent,
        "--dashboard-agent-grpc-port": ports.dashboard_agent_grpc,
        "--dashboard-agent-listen-port": ports.dashboard_agent_http,
        "--metrics-export-port": ports.metrics_export,
        "--min-worker-port": ports.min_worker_port,
        "--max-worker-port": ports.max_worker_port,
    }
    return [f"{flag}={value}" for flag, value in pairs.items() if value]


def head_command(config: Config) -> list[str]:
    head = config.head
    args = [_ray_binary(), "start", "--head", f"--port={head.ray_port}", "--num-cpus=0",
            "--num-gpus=0", f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
            f"--object-store-memory={head.object_store_memory}", "--disable-usage-stats",
            f"--include-dashboard={str(head.include_dashboard).lower()}"]
    if head.include_dashboard:
        args += [f"--dashboard-host={head.dashboard_host}",
                 f"--dashboard-port={head.dashboard_port}"]
    if config.ports.client_server:
        args.append(f"--ray-client-server-port={config.ports.client_server}")
    if head.memory:
        args.append(f"--memory={head.memory}")
    if head.node_ip:
        args.append(f"--node-ip-address={head.node_ip}")
    return args + _port_args(config)


def worker_command(config: Config, head_address: str, num_gpus: int) -> list[str]:
    worker = config.worker
    args = [_ray_binary(), "start", f"--address={head_address}",
            f"--num-cpus={worker.num_cpus}", f"--num-gpus={num_gpus}",
            f"--object-store-memory={worker.object_store_memory}", "--disable-usage-stats"]
    if worker.memory:
        args.append(f"--memory={worker.memory}")
    if worker.node_ip:
        args.append(f"--node-ip-address={worker.node_ip}")
    return args + _port_args(config)


def run(args: list[str]) -> None:
    """Run `ray start`; a failure becomes one line with Ray's own last words."""
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = tail[-1] if tail else f"exit code {done.returncode}"
        raise RayInferError(f"`ray start` failed: {reason}")


def stop() -> None:
    subprocess.run([_ray_binary(), "stop", "--grace-period", "10"], capture_output=True,
                   check=False)
