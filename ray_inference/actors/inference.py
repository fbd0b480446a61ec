"""The inference actor: one loaded model and its engine, pinned to a worker node.

It is an asyncio actor; the engine's own thread runs the batch. A caller (the gateway's
router) opens one stream per actor (`stream_to`, a Ray streaming generator) and submits
requests to it (`submit`): each message of that stream carries the chunks that every one of
the caller's requests got since the last, so an actor sends one Ray message per engine
hand-over instead of one per request (each costs the actor, Ray and the gateway CPU time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import ray

from ray_inference import logs
from ray_inference.config import EngineConfig, LoggingConfig
from ray_inference.engine.types import GenerationRequest

log = logging.getLogger("ray_inference.worker")


@ray.remote(max_restarts=0, max_task_retries=0)
class InferenceActor:
    def __init__(self, model_entry: str, engine: dict, logging_config: dict, threads: int,
                 use_gpu: bool = False):
        import torch

        from ray_inference.engine import create_engine
        from ray_inference.models import loader, registry

        self._logging = LoggingConfig.model_validate(logging_config)
        logs.setup(self._logging.level, self._logging.format)
        torch.set_num_threads(threads)
        engine_config = EngineConfig.model_validate(engine)
        device = loader.pick_device(prefer_gpu=use_gpu)
        self._loaded = loader.load(registry.resolve(model_entry), engine_config.dtype, device)
        self._engine = create_engine(self._loaded, engine_config)
        context = ray.get_runtime_context()
        self._info = {
            **self._loaded.describe(),
            "numerics": self._engine.numerics(),  # the settings that took effect: "fp32 int8"
            "actor_id": context.get_actor_id(),
            "node_id": context.get_node_id(),
            "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "threads": threads,
            "huge_page_bytes": self._engine.huge_page_bytes,  # weights moved onto 2 MB pages
        }
        self._served = 0
        self._outboxes: dict[str, _CallerOutbox] = {}  # caller -> chunks not yet sent to it
        self._streams: dict[str, tuple[str, str]] = {}  # stream id -> (caller, request id)
        self._forwarding: set[asyncio.Task] = set()
        logs.event(log, "model loaded", **{k: self._info[k] for k in (
            "model", "task", "device", "dtype", "numerics", "parameters", "load_s")},
                   rss_mb=logs.rss_bytes() // 2**20, huge_pages_mb=self._engine.huge_page_bytes >> 20)

    def describe(self) -> dict[str, Any]:
        return {**self._info, **self._engine.load(), "served": self._served,
                "rss_bytes": logs.rss_bytes(), "engine": self._engine.stats.to_dict()}

    def ping(self) -> bool:
        return True

    async def stream_to(self, caller: str):
        """The stream of `caller`'s requests: each message a list of (stream id, chunk dict of
        engine.types.Chunk, or the exception that ended that request). Ending it (the caller
        cancels it, or goes away) cancels the caller's requests still running."""
        outbox = self._outbox(caller)
        try:
            while True:
                yield await outbox.take()
        finally:
            self._outboxes.pop(caller, None)
            for stream_id, (owner, _) in list(self._streams.items()):
                if owner == caller:
                    self.cancel(stream_id)

    async def submit(self, caller: str, stream_id: str, request: dict[str, Any],
                     route: dict[str, Any] | None = None) -> None:
        """Start a request whose chunks go out on `caller`'s stream under `stream_id`; a
        request the engine refuses (bad input, a full queue) raises here."""
        parsed = GenerationRequest.from_dict(request)
        stream = self._engine.submit(parsed, asyncio.get_running_loop())
        outbox = self._outbox(caller)
        self._streams[stream_id] = (caller, parsed.request_id)
        task = asyncio.get_running_loop().create_task(
            self._forward(stream_id, parsed, stream, outbox, route or {}))
        self._forwarding.add(task)  # the loop keeps only weak references to its tasks
        task.add_done_callback(self._forwarding.discard)

    def _outbox(self, caller: str) -> _CallerOutbox:
        """Made by whichever comes first, the caller's stream or its first request."""
        return self._outboxes.setdefault(caller, _CallerOutbox())

    def cancel(self, stream_id: str) -> None:
        """The caller gave up on a request (its client went away)."""
        entry = self._streams.get(stream_id)
        if entry:
            self._engine.cancel(entry[1])

    async def _forward(self, stream_id: str, parsed: GenerationRequest, stream, outbox,
                       route: dict[str, Any]) -> None:
        started = time.perf_counter()
        last = None
        try:
            async for chunk in stream.paced(self._stream_pause):
                last = chunk
                outbox.put(stream_id, chunk.to_dict())
        except Exception as exc:  # the engine failed the request: the caller raises it
            outbox.put(stream_id, exc)
        finally:
            self._streams.pop(stream_id, None)
            if not stream.finished:
                self._engine.cancel(parsed.request_id)
            self._served += 1
            self._log_request(parsed, last, route, time.perf_counter() - started)

    def _stream_pause(self) -> float:
        """How long a request's next chunk waits after one was sent. Every message costs the
        actor, the gateway and the client CPU time, so this actor sends at most
        `stream_messages_per_s` in all: under load each request's tokens go out together,
        while a lone request still streams every token."""
        per_second = self._engine.config.stream_messages_per_s
        return self._engine.load()["running"] / per_second if per_second else 0.0

    def _log_request(self, request: GenerationRequest, last, route: dict, elapsed: float) -> None:
        prompt = request.prompt if request.messages is None else request.messages[-1]["content"]
        fields = {"request_id": request.request_id, "node": route.get("node_label", "?"),
                  "actor": self._info["actor_id"][:8], "model": self._loaded.name}
        if self._logging.log_prompts:
            fields["prompt"] = logs.short(prompt, self._logging.prompt_chars)
        if last is None or last.finish_reason is None:
            logs.event(log, "request cancelled", **fields, elapsed_s=round(elapsed, 3))
            return
        generated = last.completion_tokens
        logs.event(log, "request done", **fields, finish=last.finish_reason,
                   tokens_in=last.prompt_tokens, tokens_out=generated,
                   queue_s=round(last.queue_s, 3), generation_s=round(last.generation_s, 3),
                   tok_s=round(generated / last.generation_s, 1) if last.generation_s else 0,
                   batch=last.batch_size, rss_mb=logs.rss_bytes() // 2**20)

    def stop(self) -> None:
        self._engine.shutdown()


class _CallerOutbox:
    """The chunks waiting for one caller's stream."""

    def __init__(self):
        self._items: list[tuple[str, Any]] = []
        self._ready = asyncio.Event()

    def put(self, stream_id: str, item: Any) -> None:
        self._items.append((stream_id, item))
        self._ready.set()

    async def take(self) -> list[tuple[str, Any]]:
        """Everything put so far, once there is something. The engine hands a step's chunks
        to every request's task at once; one turn of the event loop lets them all put theirs
        before the message goes."""
        await self._ready.wait()
        await asyncio.sleep(0)
        self._ready.clear()
        items, self._items = self._items, []
        return items
