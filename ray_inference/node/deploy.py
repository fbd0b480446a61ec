"""Create the cluster's actors: the coordinator on the head, inference actors on a worker.

The entrypoints and the tests (on a `ray.cluster_utils.Cluster`) share these functions, so
what the tests prove is what the containers run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_inference import COORDINATOR_NAME, HEAD_RESOURCE
from ray_inference.actors.coordinator import Coordinator
from ray_inference.actors.inference import InferenceActor
from ray_inference.config import Config
from ray_inference.errors import ModelLoadError
from ray_inference.node.stop_signals import never_stopped


def start_coordinator(config: Config):
    """Create (or find) the detached coordinator, pinned to the head."""
    return Coordinator.options(
        name=COORDINATOR_NAME, namespace=config.namespace, lifetime="detached",
        get_if_exists=True, resources={HEAD_RESOURCE: 0.01},
    ).remote(config.logging.events, config.logging.model_dump())


def find_coordinator(namespace: str):
    return ray.get_actor(COORDINATOR_NAME, namespace=namespace)


def detect_gpus(requested: int | str) -> int:
    if requested != "auto":
        return int(requested)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_inference_actors(config: Config, node_id: str, num_gpus: int = 0) -> list[Any]:
    """One actor per GPU on GPU nodes, else `worker.replicas` per model, all pinned here."""
    worker = config.worker
    pin = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    runtime_env = actor_runtime_env(config)
    handles = []
    for entry in worker.models:
        if num_gpus > 0:
            threads = max(1, worker.num_cpus // (num_gpus * len(worker.models)))
            placements = [(threads, 1)] * num_gpus
        else:
            per_actor = max(1, worker.num_cpus // (worker.replicas * len(worker.models)))
            threads = config.engine.torch_threads or per_actor
            placements = [(per_actor, 0)] * worker.replicas
        for cpus, gpus in placements:
            handles.append(InferenceActor.options(
                num_cpus=cpus, num_gpus=gpus, scheduling_strategy=pin, runtime_env=runtime_env,
            ).remote(entry, config.engine.model_dump(), config.logging.model_dump(),
                     threads, gpus > 0))
    return handles


def actor_runtime_env(config: Config) -> dict[str, Any] | None:
    """What an inference actor's process starts with: the OpenMP spin count (docs/engine.md)."""
    spin = config.engine.openmp_spin_count
    return None if spin is None else {"env_vars": {"GOMP_SPINCOUNT": str(spin)}}


def wait_ready(handles: list[Any], timeout_s: float = 900,
               check: Callable[[], None] = never_stopped) -> list[dict[str, Any]]:
    """Wait until every actor has loaded its model, calling `check` every second; a load
    failure becomes one clear line."""
    refs = [h.describe.remote() for h in handles]
    deadline = time.monotonic() + timeout_s
    while len(ray.wait(refs, num_returns=len(refs), timeout=1.0)[0]) < len(refs):
        check()
        if time.monotonic() > deadline:
            raise ModelLoadError(f"the inference actors did not load within {timeout_s:g} s")
    try:
        return ray.get(refs)
    except RayActorError as exc:
        cause = getattr(exc, "cause", None) or exc
        message = str(getattr(cause, "message", None) or cause).strip().splitlines()
        reason = next((line for line in reversed(message) if "ModelLoadError" in line), None)
        raise ModelLoadError(reason.split("ModelLoadError: ", 1)[-1] if reason
                             else (message[-1] if message else "an inference actor died")) from None


def register(coordinator, handles: list[Any], infos: list[dict[str, Any]]) -> dict[str, str]:
    items = [{"handle": h, "info": i} for h, i in zip(handles, infos, strict=True)]
    return ray.get(coordinator.register.remote(items), timeout=30)
