"""Shared fixtures: tiny models on disk and a real Ray cluster (0-CPU head + worker nodes)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import tiny_models


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (until someone takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="rayinfer-models-"))
    for name, make in (("tiny-llama", tiny_models.make_llama), ("tiny-gpt2", tiny_models.make_gpt2),
                       ("tiny-t5", tiny_models.make_t5), ("tiny-bert", tiny_models.make_bert)):
        make(root / name)
    return root


@pytest.fixture(scope="session")
def tiny_llama(model_dir) -> str:
    return f"tiny-llama={model_dir / 'tiny-llama'}"


def make_config(models: list[str], **engine):
    from ray_inference import config

    return config.from_dict({
        "worker": {"num_cpus": 1, "models": models, "register_interval_s": 1.0,
                   "drain_timeout_s": 30},
        # fp32: tests compare greedy answers across workers, batches and resumes, and only
        # fp32 gives the same tokens whatever else shares the batch (on CPUs with AMX, `auto`
        # picks bf16, whose rounding depends on the batch's shape).
        "engine": {"max_batch_size": 32, "dtype": "float32", **engine},
        "logging": {"level": "INFO", "events": 200},
    }, env={})


class LocalCluster:
    """A `ray.cluster_utils.Cluster`: a head offering no CPU plus worker nodes of 1 CPU."""

    def __init__(self, config):
        import ray
        from ray.cluster_utils import Cluster

        from ray_inference import HEAD_RESOURCE
        from ray_inference.node import deploy

        self.config = config
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "resources": {HEAD_RESOURCE: 1},
            "_system_config": {"health_check_period_ms": 1000,
                               "health_check_failure_threshold": 3,
                               "health_check_timeout_ms": 1000},
        })
        ray.init(address=self.cluster.address, namespace=config.namespace,
                 log_to_driver=False)
        self.coordinator = deploy.start_coordinator(config)
        self.workers: list[dict] = []

    def add_worker(self, config=None):
        """A worker node whose actors are created and registered by the real WorkerAgent."""
        from ray_inference.node.worker import WorkerAgent

        config = config or self.config
        node = self.cluster.add_node(num_cpus=config.worker.num_cpus, num_gpus=0)
        self.cluster.wait_for_nodes()
        agent = WorkerAgent(config, node.node_id)
        agent.start()
        self.workers.append((node, agent))
        return node, agent

    def shutdown(self):
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_llama):
    local = LocalCluster(make_config([tiny_llama]))
    local.add_worker()
    local.add_worker()
    yield local
    local.shutdown()


class Gateway:
    """The real gateway app served by uvicorn on 127.0.0.1, in a thread of this driver."""

    def __init__(self, api_key: str | None = None, max_in_flight: int = 1024, namespace="rayinfer"):
        import socket
        import threading
        import time

        import uvicorn

        from ray_inference.gateway.app import create_app
        from ray_inference.router import Router

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(Router(namespace, 3), api_key, max_in_flight)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def gateway(cluster):
    server = Gateway()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway_url(gateway) -> str:
    return gateway.url
