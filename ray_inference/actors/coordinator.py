"""The coordinator: a registry of inference actors and the router's source of truth.

A named, detached actor in the rayinfer namespace, pinned to the head by the head-only custom
resource and asking for no CPU. Workers register their actors (idempotently, renewed
periodically, so a restarted coordinator fills up again); the gateway asks it which actor
should serve a request and reports back. It never runs a model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from ray_inference import logs
from ray_inference.errors import ModelNotFound, NoWorkerAvailable

log = logging.getLogger("ray_inference.coordinator")
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 10.0


@dataclass
class ActorEntry:
    actor_id: str
    handle: Any
    model: str
    info: dict[str, Any]
    node_label: str
    state: str = "ready"  # ready | draining | suspect
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    renewed_at: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        keep = ("task", "device", "dtype", "numerics", "hostname", "ip", "node_id",
                "context_length", "parameters", "pid", "rss_bytes")
        return {"actor_id": self.actor_id, "model": self.model, "node_label": self.node_label,
                "state": self.state, "load": self.outstanding, "served": self.served,
                **{k: self.info.get(k) for k in keep}}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Coordinator:
    def __init__(self, events: int = 500, logging_config: dict | None = None):
        logging_config = logging_config or {}
        logs.setup(logging_config.get("level", "INFO"), logging_config.get("format", "text"))
        self._actors: dict[str, ActorEntry] = {}
        self._labels: dict[str, str] = {}  # node id -> "Worker Node #N"
        self._hosts: dict[str, tuple[str, str]] = {}  # node id -> (host key, label)
        self._next_label = 0
        self._known_models: set[str] = set()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=events)
        self._started = time.time()
        self._pinger: asyncio.Task | None = None
        self._record("coordinator started")

    # ---- events --------------------------------------------------------------------------
    def _record(self, kind: str, **fields: Any) -> None:
        self._events.append({"ts": time.time(), "event": kind, **fields})
        logs.event(log, kind, **fields)

    def record(self, kind: str, fields: dict[str, Any]) -> None:
        """Let the gateway add its routing decisions and retries to the event log."""
        self._record(kind, **fields)

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self._events)[-limit:]

    # ---- registration --------------------------------------------------------------------
    def _label_for(self, info: dict[str, Any]) -> str:
        """Labels follow the node; a node that rejoins from the same host keeps its number."""
        node_id, host = info.get("node_id"), f"{info.get('hostname')}|{info.get('ip')}"
        if node_id in self._labels:
            return self._labels[node_id]
        live_nodes = {e.info.get("node_id") for e in self._actors.values()}
        for old_node, (old_host, old_label) in self._hosts.items():
            if old_host == host and old_node not in live_nodes:
                label = old_label
                del self._hosts[old_node]
                self._labels.pop(old_node, None)
                break
        else:
            self._next_label += 1
            label = f"Worker Node #{self._next_label}"
        self._labels[node_id] = label
        self._hosts[node_id] = (host, label)
        return label

    async def register(self, actors: list[dict[str, Any]]) -> dict[str, str]:
        """Add or renew actors: [{"handle": ActorHandle, "info": describe()}]. Idempotent."""
        if self._pinger is None:
            self._pinger = asyncio.get_running_loop().create_task(self._ping_forever())
        labels = {}
        for item in actors:
            info = item["info"]
            actor_id = info["actor_id"]
            entry = self._actors.get(actor_id)
            if entry is None:
                label = self._label_for(info)
                entry = ActorEntry(actor_id, item["handle"], info["model"], info, label)
                self._actors[actor_id] = entry
                self._known_models.add(info["model"])
                self._record("actor registered", actor=actor_id[:8], model=info["model"],
                             node=label, host=info.get("hostname"), ip=info.get("ip"),
                             device=info.get("device"))
            else:
                entry.info.update(info)
                entry.renewed_at = time.time()
                if entry.state == "suspect":
                    entry.state = "ready"
            labels[actor_id] = entry.node_label
        return labels

    def set_draining(self, actor_ids: list[str]) -> int:
        count = 0
        for actor_id in actor_ids:
            entry = self._actors.get(actor_id)
            if entry and entry.state != "draining":
                entry.state = "draining"
                count += 1
                self._record("actor draining", actor=actor_id[:8], node=entry.node_label)
        return count

    def deregister(self, actor_ids: list[str]) -> int:
        count = 0
        for actor_id in actor_ids:
            entry = self._actors.pop(actor_id, None)
            if entry:
                count += 1
                self._record("actor deregistered", actor=actor_id[:8], node=entry.node_label)
        return count

    # ---- routing -------------------------------------------------------------------------
    def pick(self, model: str, exclude: list[str] | None = None) -> dict[str, Any]:
        """Choose the actor for one request: power of two choices on outstanding requests."""
        excluded = set(exclude or ())
        ready = [e for e in self._actors.values()
                 if e.model == model and e.state == "ready" and e.actor_id not in excluded]
        if not ready:
            if model not in self._known_models:
                served = sorted({e.model for e in self._actors.values()})
                raise ModelNotFound(f"model {model!r} is not served by this cluster; served: "
                                    f"{', '.join(served) or 'none yet'}", "model")
            raise NoWorkerAvailable(f"no worker serves model {model!r} right now; retry when a "
                                    "worker has (re)registered", "model")
        pair = random.sample(ready, 2) if len(ready) > 1 else ready
        chosen = min(pair, key=lambda e: (e.outstanding, e.served))
        chosen.outstanding += 1
        return {"handle": chosen.handle, "actor_id": chosen.actor_id, "model": model,
                "node_label": chosen.node_label, "hostname": chosen.info.get("hostname"),
                "ip": chosen.info.get("ip"), "node_id": chosen.info.get("node_id"),
                "device": chosen.info.get("device"), "load": chosen.outstanding}

    def release(self, actor_id: str, ok: bool = True) -> None:
        entry = self._actors.get(actor_id)
        if entry:
            entry.outstanding = max(0, entry.outstanding - 1)
            if ok:
                entry.served += 1

    async def report_failure(self, actor_id: str, error: str) -> str:
        """The gateway saw a call to this actor fail: find out whether it is gone."""
        entry = self._actors.get(actor_id)
        if entry is None:
            return "unknown"
        entry.outstanding = max(0, entry.outstanding - 1)
        entry.failures += 1
        verdict = await self._check(entry)
        self._record("actor failed", actor=actor_id[:8], node=entry.node_label,
                     error=error[:200], verdict=verdict)
        return verdict

    async def _check(self, entry: ActorEntry) -> str:
        try:
            await asyncio.wait_for(entry.handle.ping.remote(), PING_TIMEOUT_S)
        except (ActorDiedError, RayActorError) as exc:
            if isinstance(exc, ActorUnavailableError):
                entry.state = "suspect" if entry.state != "draining" else entry.state
                return "suspect"
            self._actors.pop(entry.actor_id, None)
            self._record("actor dropped", actor=entry.actor_id[:8], node=entry.node_label,
                         reason="died")
            return "dead"
        except (TimeoutError, GetTimeoutError):
            if entry.state == "ready":
                entry.state = "suspect"
            return "suspect"
        if entry.state == "suspect":
            entry.state = "ready"
        return "alive"

    async def _ping_forever(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            entries = list(self._actors.values())
            if entries:
                await asyncio.gather(*(self._check(e) for e in entries), return_exceptions=True)

    # ---- views ---------------------------------------------------------------------------
    def actors(self) -> list[dict[str, Any]]:
        return [e.public() for e in self._actors.values()]

    def models(self) -> list[dict[str, Any]]:
        models: dict[str, dict[str, Any]] = {}
        for entry in self._actors.values():
            item = models.setdefault(entry.model, {"id": entry.model, "actors": 0, "ready": 0,
                                                   "task": entry.info.get("task"),
                                                   "context_length":
                                                       entry.info.get("context_length")})
            item["actors"] += 1
            item["ready"] += entry.state == "ready"
        return sorted(models.values(), key=lambda m: m["id"])

    def health(self) -> dict[str, Any]:
        ready = sum(e.state == "ready" for e in self._actors.values())
        return {"actors": len(self._actors), "ready": ready,
                "models": sorted({e.model for e in self._actors.values()}),
                "uptime_s": round(time.time() - self._started, 1), "rss_bytes": logs.rss_bytes()}

    def node_labels(self) -> dict[str, str]:
        return dict(self._labels)
