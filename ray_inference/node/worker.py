"""`rayinfer worker`: join the cluster, load models into pinned actors, register, drain.

The agent keeps the registration alive (so a restarted coordinator learns about this worker
again) and on SIGTERM drains: the coordinator stops routing here, in-flight requests finish,
then the actors are deregistered and stopped.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from ray_inference import logs
from ray_inference.config import Config, ConfigError, load
from ray_inference.errors import RayInferError
from ray_inference.models import registry
from ray_inference.node import deploy, ray_process
from ray_inference.node.banner import show
from ray_inference.node.stop_signals import StopSignals, never_stopped

log = logging.getLogger("ray_inference.worker")


class WorkerAgent:
    def __init__(self, config: Config, node_id: str, num_gpus: int = 0,
                 check: Callable[[], None] = never_stopped):
        self.config = config
        self.node_id = node_id
        self.num_gpus = num_gpus
        self.handles: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.labels: dict[str, str] = {}
        self._stop = threading.Event()
        self._check = check  # while starting: raises once a stop signal has arrived

    @property
    def actor_ids(self) -> list[str]:
        return [i["actor_id"] for i in self.infos]

    def start(self) -> None:
        self.handles = deploy.start_inference_actors(self.config, self.node_id, self.num_gpus)
        self.infos = deploy.wait_ready(self.handles, check=self._check)
        self.register(wait=True)

    def _coordinator(self, wait: bool):
        delay = 0.5
        while True:
            try:
                return deploy.find_coordinator(self.config.namespace)
            except ValueError:
                if not wait or self._stop.is_set():
                    raise
                logs.event(log, "waiting for the coordinator", retry_in_s=delay)
                for _ in range(int(delay * 2)):  # a stop signal is noticed within 0.5 s
                    self._check()
                    time.sleep(0.5)
                delay = min(delay * 2, 10.0)

    def register(self, wait: bool = False) -> None:
        coordinator = self._coordinator(wait)
        self.labels = deploy.register(coordinator, self.handles, self.infos)

    def keep_registered(self) -> None:
        """Renew the registration until stopped; re-finds a coordinator that was re-created."""
        while not self._stop.wait(self.config.worker.register_interval_s):
            try:
                self.refresh_infos()
                self.register(wait=False)
            except Exception as exc:  # the head may be restarting: try again next round
                logs.event(log, "registration renewal failed", error=str(exc).splitlines()[0])

    def refresh_infos(self, timeout_s: float = 5.0) -> None:
        """The actors' descriptions as of now, so that the coordinator shows their current RSS;
        one that does not answer in time keeps its last (the coordinator's pings judge it)."""
        refs = [h.describe.remote() for h in self.handles]
        answered = set(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0])
        infos = []
        for ref, last in zip(refs, self.infos, strict=True):
            try:
                infos.append(ray.get(ref) if ref in answered else last)
            except ray.exceptions.RayError:
                infos.append(last)
        self.infos = infos

    def in_flight(self) -> int:
        loads = ray.get([h.describe.remote() for h in self.handles], timeout=30)
        return sum(load["running"] + load["waiting"] for load in loads)

    def drain(self) -> int:
        """Stop new traffic, wait for in-flight requests, deregister, stop the actors."""
        self._stop.set()
        coordinator = deploy.find_coordinator(self.config.namespace)
        ray.get(coordinator.set_draining.remote(self.actor_ids), timeout=30)
        logs.event(log, "draining", actors=len(self.handles))
        deadline = time.monotonic() + self.config.worker.drain_timeout_s
        remaining = self.in_flight()
        while remaining and time.monotonic() < deadline:
            time.sleep(0.2)
            remaining = self.in_flight()
        ray.get(coordinator.deregister.remote(self.actor_ids), timeout=30)
        for handle in self.handles:
            ray.kill(handle)
        logs.event(log, "drained", abandoned=remaining)
        return remaining


def run_worker(config_path: str | None = None, head_address: str | None = None) -> None:
    config = load(config_path)
    logs.setup(config.logging.level, config.logging.format)
    head = head_address or config.worker.head_address
    if not head:
        raise ConfigError("no head address: pass --head HOST:PORT or set worker.head_address "
                          "(RAY_HEAD_ADDRESS)")
    for entry in config.worker.models:  # a missing model fails now, not after Ray starts
        registry.resolve(entry)
    signals = StopSignals()
    signals.install()
    ray_process.check_ports_free(ray_process.ports_to_bind(config, head=False))
    ray_process.wait_for_head(head, config.worker.head_wait_s, signals.check)
    num_gpus = deploy.detect_gpus(config.worker.num_gpus)
    node = ray_process.RayNode(ray_process.worker_command(config, head, num_gpus))
    node.start(check=signals.check)
    try:
        ray.init(address=head, namespace=config.namespace, log_to_driver=True,
                 logging_level="WARNING", _node_ip_address=config.worker.node_ip)
        signals.install()  # again: ray.init installed its own SIGTERM handler
        agent = WorkerAgent(config, ray.get_runtime_context().get_node_id(), num_gpus,
                            signals.check)
        agent.start()
        show("WORKER NODE READY", {
            "joined": head,
            "node": f"{agent.labels.get(agent.actor_ids[0], '?')} ({socket.gethostname()}, "
                    f"{ray.util.get_node_ip_address()})",
            "resources": f"{config.worker.num_cpus} CPU, {num_gpus} GPU",
            "actors": ", ".join(f"{i['model']} on {i['device']} ({i['dtype']}, "
                                f"{i['rss_bytes'] // 2**20} MB)" for i in agent.infos),
            "next": "requests arrive through the head's gateway",
        })
        renewer = threading.Thread(target=agent.keep_registered, daemon=True)
        renewer.start()
        while not signals.stopping.wait(1.0):
            if not node.alive():
                raise RayInferError("this worker's Ray node stopped (lost the head?); "
                                    "exiting so the restart policy starts a fresh one")
        agent.drain()
    finally:
        ray.shutdown()
        node.stop()
