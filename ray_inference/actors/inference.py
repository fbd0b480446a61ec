"""The inference actor: one loaded model and its engine, pinned to a worker node.

It is an asyncio actor: `generate` is an async generator (a Ray streaming generator), so
tokens flow to the caller as they are made, while the engine's own thread runs the batch.
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
        logs.event(log, "model loaded", **{k: self._info[k] for k in (
            "model", "task", "device", "dtype", "numerics", "parameters", "load_s")},
                   rss_mb=logs.rss_bytes() // 2**20, huge_pages_mb=self._engine.huge_page_bytes >> 20)

    def describe(self) -> dict[str, Any]:
        return {**self._info, **self._engine.load(), "served": self._served,
                "rss_bytes": logs.rss_bytes(), "engine": self._engine.stats.to_dict()}

    def ping(self) -> bool:
        return True

    async def generate(self, request: dict[str, Any], route: dict[str, Any] | None = None):
        """Stream the chunks of one request (dicts of engine.types.Chunk)."""
        route = route or {}
        parsed = GenerationRequest.from_dict(request)
        stream = self._engine.submit(parsed, asyncio.get_running_loop())
        started = time.perf_counter()
        last = None
        try:
            async for chunk in stream.paced(self._stream_pause):
                last = chunk
                yield chunk.to_dict()
        finally:
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
