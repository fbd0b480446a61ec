"""Start this machine's Ray node with `ray start`, every port pinned from the config.

Before it starts: the ports the node binds must be free and, on a worker, the head's Ray port
must answer. When it stops: nothing of `ray start`'s process group may outlive it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil

from ray_inference import HEAD_RESOURCE, logs
from ray_inference.config import Config, ConfigError
from ray_inference.errors import RayInferError
from ray_inference.node.stop_signals import never_stopped

# Token auth needs a token on every node; rayinfer keeps Ray's ports inside the cluster's own
# network instead (firewall / private bridge). Set RAY_AUTH_MODE=token yourself to add it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
log = logging.getLogger("ray_inference.node")


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
    if not head.autoscaler_monitor:
        args.append("--no-monitor")
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


# Ray's ports a node binds for itself; worker processes take the min-max range as they start.
_OWN_PORTS = ("node_manager", "object_manager", "runtime_env_agent", "dashboard_agent_grpc",
              "dashboard_agent_http", "metrics_export")


def ports_to_bind(config: Config, head: bool) -> dict[str, tuple[str, int]]:
    """{setting: (host, port)} of the fixed ports this node is about to bind."""
    names = (*_OWN_PORTS, "client_server") if head else _OWN_PORTS
    ports = {f"ports.{name}": ("", getattr(config.ports, name)) for name in names}
    if head:
        ports["head.ray_port"] = ("", config.head.ray_port)
        ports["head.gateway_port"] = (config.head.gateway_host, config.head.gateway_port)
        if config.head.include_dashboard:
            ports["head.dashboard_port"] = (config.head.dashboard_host,
                                            config.head.dashboard_port)
    return {key: (host, port) for key, (host, port) in ports.items() if port}


def check_ports_free(ports: dict[str, tuple[str, int]]) -> None:
    """Fail at once, naming the setting, when a port is taken: with the GCS port taken `ray
    start` failed 41 s later, its last line a fragment pointing at gcs_server.out, and with the
    gateway's port taken the head printed its READY banner before uvicorn failed."""
    for key, (host, port) in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # A port whose last connection lingers in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise RayInferError(
                    f"port {port} ({key}) cannot be used on this machine ({exc.strerror}): stop "
                    f"what listens there, or set {key} to another port") from None


def wait_for_head(address: str, timeout_s: float,
                  check: Callable[[], None] = never_stopped) -> None:
    """Wait until the head's Ray (GCS) port takes a TCP connection: `ray start` itself would
    wait about two minutes, silently, and then name an internal RPC. Logs every 10 s; calls
    `check` (stop_signals.py) between tries."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    next_log = 0.0
    while True:
        check()
        try:
            with socket.create_connection((host, port), timeout=3):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        now = time.monotonic()
        if now >= deadline:
            raise RayInferError(
                f"the head's Ray port {host}:{port} did not answer within {timeout_s:g} s "
                f"({reason}): start `rayinfer head` there first, or check the address and that "
                f"this host may reach that port")
        if now >= next_log:
            logs.event(log, "waiting for the head", address=f"{host}:{port}", reason=reason)
            next_log = now + 10
        time.sleep(min(1.0, deadline - now))


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port)."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"the head address must be HOST:PORT, got {address!r}")
    return host, int(port)


class RayNode:
    """This process's own Ray node: `ray start --block` as a child, stopped with us.

    Owning the child (instead of `ray stop`, which kills every Ray process on the machine)
    lets several nodes share one host in tests and keeps a container's lifecycle simple.
    """

    STARTED = "Ray runtime started"

    def __init__(self, args: list[str]):
        self._args = [*args, "--block"]
        self._process: subprocess.Popen | None = None
        self._lines: list[str] = []

    def start(self, timeout_s: float = 120, check: Callable[[], None] = never_stopped) -> None:
        """Start `ray start` and wait for its node to be up, calling `check` twice a second
        (a stop signal ends the wait, and this node)."""
        # rayinfer drains its own actors before stopping the node: Ray's own SIGTERM drain
        # would only wait 30 s for a node that is never idle (the head's coordinator).
        env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self._process = subprocess.Popen(self._args, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, bufsize=1,
                                         env=env, start_new_session=True)
        started = threading.Event()

        def pump() -> None:
            assert self._process and self._process.stdout
            for line in self._process.stdout:
                self._lines = [*self._lines[-50:], line.rstrip()]
                if self.STARTED in line:
                    started.set()
            started.set()

        threading.Thread(target=pump, daemon=True, name="ray-start-output").start()
        deadline = time.monotonic() + timeout_s
        try:
            while not started.wait(0.5) and time.monotonic() < deadline:
                check()
        except BaseException:  # a stop signal (stop_signals.py) while Ray starts
            self.stop()
            raise
        if self._process.poll() is not None or not any(self.STARTED in x for x in self._lines):
            tail = [line for line in self._lines if line.strip()]
            self.stop()
            reason = tail[-1] if tail else "no output"
            raise RayInferError(f"`ray start` failed: {reason.strip()}")

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout_s: float = 30, stragglers_s: float = 5) -> None:
        """SIGTERM `ray start`, then end its whole session: the raylet's agents can outlive
        it (for about a minute when the head went away at the same moment), so whatever is
        left `stragglers_s` after it exits, or `timeout_s` if it does not, is killed."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                stragglers_s = 0
        end_process_group(self._process.pid, stragglers_s)
        self._process.wait()


def end_process_group(group: int, grace_s: float) -> None:
    """Wait up to `grace_s` for every process of `group` to exit, then SIGKILL the rest."""
    _wait_for_group(group, grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    _wait_for_group(group, 5.0)  # a process dies of SIGKILL when it next runs, not at once


def _wait_for_group(group: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(group: int) -> bool:
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):  # gone meanwhile
            if os.getpgid(process.pid) == group and running(process.pid):
                return True
    return False


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie nobody reaps, as under a container's PID 1 that is
    not an init, has ended all the same)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
