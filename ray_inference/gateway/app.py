"""The FastAPI app: thin handlers that validate, hand to the router and stream back."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ray_inference import HEAD_RESOURCE, __version__
from ray_inference.errors import (
    InvalidRequest,
    NoWorkerAvailable,
    Overloaded,
    RayInferError,
    Unauthorized,
    unwrap,
)
from ray_inference.gateway.metrics import Metrics
from ray_inference.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseBuilder,
    error_body,
)
from ray_inference.logs import rss_bytes
from ray_inference.router import Router

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
COORDINATOR_TIMEOUT_S = 5.0


def _error(exc: RayInferError, request_id: str | None = None) -> JSONResponse:
    headers = {"X-Request-ID": request_id} if request_id else {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(error_body(exc.message, exc.error_type, exc.param, exc.code),
                        status_code=exc.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in first["loc"] if p != "body"]
    param = ".".join(loc) or None
    if first["type"] == "missing":
        return f"{param} is required", param
    message = first["msg"].removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def create_app(router: Router, api_key: str | None = None, max_in_flight: int = 1024) -> FastAPI:
    app = FastAPI(title="rayinfer gateway", version=__version__, docs_url="/docs",
                  redoc_url=None)
    metrics = Metrics()
    app.state.metrics = metrics
    open_requests = {"count": 0}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(InvalidRequest(message, param), request.state.request_id)

    @app.exception_handler(RayInferError)
    async def _known(request: Request, exc: RayInferError):
        return _error(exc, getattr(request.state, "request_id", None))

    @app.middleware("http")
    async def _identify_and_authenticate(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        if api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(Unauthorized("a valid API key is required: send it as "
                                           "'Authorization: Bearer <key>'"),
                              request.state.request_id)
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    async def _coordinator(method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(router.call(method, *args), COORDINATOR_TIMEOUT_S)
        except (TimeoutError, ValueError, ray.exceptions.RayError) as exc:
            raise NoWorkerAvailable(f"the coordinator does not answer: {exc}".splitlines()[0]) \
                from None

    async def _generate(kind: str, body: ChatCompletionRequest | CompletionRequest,
                        request: Request) -> Response:
        request_id = request.state.request_id
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        if open_requests["count"] >= max_in_flight:
            metrics.requests.labels(endpoint, body.model, "429").inc()
            raise Overloaded(f"the gateway already holds {max_in_flight} open requests",
                             retry_after=1.0)
        payload = {**body.engine_request(), "request_id": request_id}
        builder = ResponseBuilder(kind, request_id, body.model)
        started = time.perf_counter()
        stream = router.stream(body.model, payload)
        open_requests["count"] += 1
        metrics.in_flight.set(open_requests["count"])
        timing = {"last": started, "first": True}

        def observe(chunk: dict[str, Any]) -> None:
            now = time.perf_counter()
            if timing["first"]:
                metrics.ttft.labels(body.model).observe(now - started)
            else:  # a chunk may carry several tokens (paced streams): each gets its share
                tokens = max(1, len(chunk["token_ids"]))
                for _ in range(tokens):
                    metrics.itl.labels(body.model).observe((now - timing["last"]) / tokens)
            timing["last"] = now
            if chunk["finish_reason"]:
                metrics.e2e.labels(body.model).observe(now - started)
                metrics.generated.labels(body.model).inc(chunk["completion_tokens"])
                metrics.prompt.labels(body.model).inc(chunk["prompt_tokens"])
                if chunk.get("retries"):
                    metrics.retries.labels(body.model).inc(chunk["retries"])

        def done(status: int) -> None:
            open_requests["count"] -= 1
            metrics.in_flight.set(open_requests["count"])
            metrics.requests.labels(endpoint, body.model, str(status)).inc()

        try:
            first = await anext(stream)  # errors before the first token keep their status
        except StopAsyncIteration:
            done(500)
            raise RayInferError("the worker ended the request without an answer") from None
        except Exception as exc:
            cause = unwrap(exc)
            done(getattr(cause, "status", 500))
            await stream.aclose()
            if isinstance(cause, RayInferError):
                raise cause from None
            raise
        observe(first)
        timing["first"] = False

        if not body.stream:
            text, last = [first["text"]], first
            try:
                async for chunk in stream:
                    observe(chunk)
                    text.append(chunk["text"])
                    last = chunk
            except Exception as exc:
                done(getattr(unwrap(exc), "status", 500))
                cause = unwrap(exc)
                raise cause if isinstance(cause, RayInferError) else exc from None
            done(200)
            return JSONResponse(builder.complete({**last, "text": "".join(text)}))

        async def events():
            status = 200
            try:
                yield f"data: {json.dumps(builder.chunk(first, True))}\n\n"
                if not first["finish_reason"]:
                    async for chunk in stream:
                        observe(chunk)
                        yield f"data: {json.dumps(builder.chunk(chunk, False))}\n\n"
            except Exception as exc:  # headers are sent: report in-band, then end the stream
                cause = unwrap(exc)
                status = getattr(cause, "status", 500)
                known = isinstance(cause, RayInferError)
                body_ = error_body(cause.message if known else "internal error",
                                   cause.error_type if known else "server_error")
                yield f"data: {json.dumps(body_)}\n\n"
            finally:
                await stream.aclose()
                done(status)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _generate("chat", body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate("text", body, request)

    @app.get("/v1/models")
    async def models():
        served = await _coordinator("models")
        return {"object": "list", "data": [
            {"id": m["id"], "object": "model", "created": 0, "owned_by": "rayinfer",
             "rayinfer": {"actors": m["actors"], "ready": m["ready"], "task": m["task"],
                          "context_length": m["context_length"]}} for m in served]}

    @app.get("/v1/cluster")
    async def cluster():
        actors, labels, state = await asyncio.gather(
            _coordinator("actors"), _coordinator("node_labels"), _coordinator("health"))
        nodes = await asyncio.to_thread(ray.nodes)
        view = describe_cluster(nodes, actors, labels)
        # The head's own processes: this gateway (the driver) and the coordinator actor.
        view["head_processes"] = {"gateway_rss_bytes": rss_bytes(),
                                  "coordinator_rss_bytes": state["rss_bytes"]}
        return view

    @app.get("/v1/events")
    async def events(limit: int = 50):
        return {"events": await _coordinator("events", max(1, min(limit, 1000)))}

    @app.get("/health/live")
    async def live():
        await _coordinator("health")
        return {"status": "ok"}

    @app.get("/health")
    async def health():
        try:
            state = await _coordinator("health")
        except NoWorkerAvailable as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, 503)
        if state["ready"] == 0:
            return JSONResponse({"status": "unavailable", "reason": "no worker has registered "
                                 "a ready inference actor yet", **state}, 503)
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def prometheus():
        with contextlib.suppress(NoWorkerAvailable):
            metrics.set_actors(await _coordinator("actors"))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def describe_cluster(nodes: list[dict], actors: list[dict], labels: dict[str, str]) -> dict:
    """Join Ray's node table with the coordinator's registry into the /v1/cluster view."""
    per_node: dict[str, int] = {}
    for actor in actors:
        per_node[actor["node_id"]] = per_node.get(actor["node_id"], 0) + 1
    rows = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        is_head = HEAD_RESOURCE in resources
        node_id = node["NodeID"]
        rows.append({
            "node_id": node_id, "role": "head" if is_head else "worker",
            "label": "Head Node" if is_head else labels.get(node_id, "Worker Node (no actors)"),
            "hostname": node.get("NodeManagerHostname"), "ip": node.get("NodeManagerAddress"),
            "alive": True,
            "resources": {k: v for k, v in resources.items()
                          if k in ("CPU", "GPU", "memory", "object_store_memory")},
            "actors": per_node.get(node_id, 0)})
    rows.sort(key=lambda r: (r["role"] != "head", r["label"]))
    workers = [r for r in rows if r["role"] == "worker"]
    return {"nodes": rows, "actors": actors, "totals": {
        "nodes": len(rows), "workers": len(workers), "actors": len(actors),
        "cpus": sum(r["resources"].get("CPU", 0) for r in rows),
        "gpus": sum(r["resources"].get("GPU", 0) for r in rows),
        "memory_bytes": sum(r["resources"].get("memory", 0) for r in rows),
        "in_flight": sum(a["load"] for a in actors)}}
