"""Send one request to a worker actor and fail over when that actor dies.

Used by the gateway, inside the head's Ray driver. The coordinator chooses the actor; this
module calls it directly (a Ray stream cannot be handed on) and, when the actor dies before or
while answering, reports it and resumes on another actor from the tokens already sent, so the
caller never sees the failure (within `router.max_attempts`).
"""

from __future__ import annotations

import asyncio
import logging
import time
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
            generator = handle.generate.remote(payload, route)
            finished = False
            try:
                async for ref in generator:
                    chunk = await ref
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
                    ray.cancel(generator)
                await asyncio.shield(self.call("release", route["actor_id"], False))
                raise

    async def complete(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """Run a request to the end; returns the joined text, usage and route."""
        started = time.perf_counter()
        text, last = [], None
        async for chunk in self.stream(model, request):
            text.append(chunk["text"])
            last = chunk
        assert last is not None
        return {**last, "text": "".join(text), "elapsed_s": time.perf_counter() - started}
