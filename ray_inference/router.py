"""Send one request to a worker actor and fail over when that actor dies.

Used by the gateway, inside the head's Ray driver. The coordinator chooses the actor; this
module calls it directly (a Ray stream cannot be handed on) and, when the actor dies before or
while answering, reports it and resumes on another actor from the tokens already sent, so the
caller never sees the failure (within `router.max_attempts`).

The chunks of all of this router's requests on one actor come over one Ray stream
(`ActorChannel`, the actor's `stream_to`), one message per engine hand-over for all of them,
and are dealt out to each request by its stream id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError

from ray_inference import COORDINATOR_NAME
from ray_inference.errors import NoWorkerAvailable, RayInferError

log = logging.getLogger("ray_inference.router")
# What a dying actor or node looks like to the caller of a stream.
ACTOR_GONE = (RayActorError, ObjectLostError, OwnerDiedError)


class Router:
    def __init__(self, namespace: str, max_attempts: int = 3):
        self._namespace = namespace
        self._max_attempts = max_attempts
        self._coordinator = None
        self._channels: dict[str, ActorChannel] = {}

    def coordinator(self):
        if self._coordinator is None:
            self._coordinator = ray.get_actor(COORDINATOR_NAME, namespace=self._namespace)
        return self._coordinator

    async def call(self, method: str, *args: Any) -> Any:
        """Call the coordinator, resolving it by name again if it was re-created."""
        try:
            return await getattr(self.coordinator(), method).remote(*args)
        except RayActorError:
            self._coordinator = None
            return await getattr(self.coordinator(), method).remote(*args)

    async def stream(self, model: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield chunk dicts; each carries `route` (who answered) and `retries`."""
        exclude: list[str] = []
        sent_ids: list[int] = list(request.get("resume_ids") or [])
        retries = 0
        while True:
            route = await self.call("pick", model, exclude)
            handle = route.pop("handle")
            payload = {**request, "resume_ids": sent_ids}
            channel = self._channel(route["actor_id"], handle)
            stream_id = uuid.uuid4().hex
            chunks = channel.open(stream_id)
            finished = False
            try:
                await handle.submit.remote(channel.caller, stream_id, payload, route)
                while not finished:
                    chunk = await chunks.get()
                    if isinstance(chunk, BaseException):
                        raise chunk
                    sent_ids.extend(chunk["token_ids"])
                    chunk["route"], chunk["retries"] = route, retries
                    finished = chunk["finish_reason"] is not None
                    yield chunk
                await self.call("release", route["actor_id"], True)
                return
            except ACTOR_GONE as exc:
                retries += 1
                exclude.append(route["actor_id"])
                verdict = await self.call("report_failure", route["actor_id"],
                                          f"{type(exc).__name__}: {exc}".splitlines()[0])
                await self.call("record", "request retried", {
                    "request_id": request.get("request_id"), "failed_actor":
                        route["actor_id"][:8], "node": route["node_label"], "verdict": verdict,
                    "tokens_sent": len(sent_ids), "attempt": retries + 1})
                if retries >= self._max_attempts:
                    raise NoWorkerAvailable(
                        f"the request failed on {retries} actors in a row; last: {exc}"
                        .splitlines()[0]) from None
            except RayInferError:
                await self.call("release", route["actor_id"], False)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                if not finished:
                    handle.cancel.remote(stream_id)
                await asyncio.shield(self.call("release", route["actor_id"], False))
                raise
            finally:
                channel.close(stream_id)

    def _channel(self, actor_id: str, handle) -> ActorChannel:
        """This router's open stream from that actor, opened now if it has none (or it ended,
        or it belongs to another event loop)."""
        loop = asyncio.get_running_loop()
        channel = self._channels.get(actor_id)
        if channel is None or channel.ended or channel.loop is not loop:
            self._channels = {key: c for key, c in self._channels.items() if not c.ended}
            channel = self._channels[actor_id] = ActorChannel(handle, loop)
        return channel

    async def complete(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """Run a request to the end; returns the joined text, usage and route."""
        started = time.perf_counter()
        text, last = [], None
        async for chunk in self.stream(model, request):
            text.append(chunk["text"])
            last = chunk
        assert last is not None
        return {**last, "text": "".join(text), "elapsed_s": time.perf_counter() - started}


class ActorChannel:
    """One actor's stream of this router's chunks, read by a task of its own and dealt out to
    each request's queue. When it fails (the actor died) every request on it gets the error."""

    def __init__(self, handle, loop: asyncio.AbstractEventLoop):
        # Whom the actor streams to: one id per channel, so a channel that ends (and the actor
        # cancelling what was sent on it) never touches the one that replaces it.
        self.caller = uuid.uuid4().hex
        self.loop = loop
        self.ended = False
        self.messages = self.chunks = 0  # received so far: messages carry several chunks
        self._queues: dict[str, asyncio.Queue] = {}
        self._generator = handle.stream_to.remote(self.caller)
        self._reader = loop.create_task(self._read())

    def open(self, stream_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[stream_id] = queue
        return queue

    def close(self, stream_id: str) -> None:
        self._queues.pop(stream_id, None)

    async def _read(self) -> None:
        try:
            async for ref in self._generator:
                batch = await ref
                self.messages += 1
                self.chunks += len(batch)
                for stream_id, item in batch:
                    queue = self._queues.get(stream_id)
                    if queue is not None:  # else the request was given up: dropped
                        queue.put_nowait(item)
            error: BaseException = RuntimeError("the actor ended its stream")
        except asyncio.CancelledError:  # this router's event loop ends: so does the stream
            with contextlib.suppress(Exception):  # Ray may be shutting down too
                ray.cancel(self._generator)
            raise
        except Exception as exc:  # each request decides what it means (ACTOR_GONE: fail over)
            error = exc
        self.ended = True
        for queue in self._queues.values():
            queue.put_nowait(error)
