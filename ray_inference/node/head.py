"""`rayinfer head`: a Ray head that only coordinates, the coordinator, and the HTTP gateway.

One process: it starts the head's Ray node (0 CPUs and 0 GPUs for models), connects as a
driver, creates the detached coordinator, and serves the gateway in the foreground until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from ray_inference import logs
from ray_inference.config import Config, load
from ray_inference.node import ray_process
from ray_inference.node.banner import show
from ray_inference.node.stop_signals import StopSignals, never_stopped


def serve_gateway(config: Config, check: Callable[[], None] = never_stopped) -> None:
    """Run the gateway in this (driver) process until it is told to stop; `check` comes
    last before uvicorn takes the signals over."""
    import uvicorn

    from ray_inference.gateway.app import create_app
    from ray_inference.router import Router

    router = Router(config.namespace, config.router.max_attempts)
    app = create_app(router, config.head.api_key, config.head.max_in_flight)
    check()
    uvicorn.run(app, host=config.head.gateway_host, port=config.head.gateway_port,
                log_level="warning", access_log=False)


def run_head(config_path: str | None = None) -> None:
    config = load(config_path)
    logs.setup(config.logging.level, config.logging.format)
    ray_process.check_ports_free(ray_process.ports_to_bind(config, head=True))
    signals = StopSignals()
    signals.install()
    node = ray_process.RayNode(ray_process.head_command(config))
    node.start(check=signals.check)
    try:
        import ray

        from ray_inference.node import deploy

        ray.init(address=f"{config.head.node_ip or '127.0.0.1'}:{config.head.ray_port}",
                 namespace=config.namespace, log_to_driver=False, logging_level="WARNING",
                 _node_ip_address=config.head.node_ip)
        signals.install()  # again: ray.init installed its own SIGTERM handler
        coordinator = deploy.start_coordinator(config)
        ray.get(coordinator.health.remote(), timeout=60)
        head_ip = config.head.node_ip or ray.util.get_node_ip_address()
        dashboard = (f"http://{config.head.dashboard_host}:{config.head.dashboard_port}"
                     if config.head.include_dashboard else "off")
        show("HEAD NODE READY: coordinator only, no model on this node", {
            "ray address": f"{head_ip}:{config.head.ray_port}",
            "dashboard": dashboard,
            "gateway": f"http://{config.head.gateway_host}:{config.head.gateway_port}",
            "hostname": socket.gethostname(),
            "resources": "0 CPU, 0 GPU for models (rayinfer_head marks this node)",
            "api key": "set" if config.head.api_key else "none (open gateway)",
            "rss": f"{logs.rss_bytes() // 2**20} MB (pid {os.getpid()})",
            "next": f"rayinfer worker --head {head_ip}:{config.head.ray_port}",
        })
        serve_gateway(config, signals.check)
    finally:
        node.stop()
