"""HTTP load generator: N concurrent clients against the gateway, streaming.

Each client sends the workload's chat requests back to back (the prompts and output lengths
the other variants of the benchmark get) until none is left;
time to first token, inter-token latency (per request: the time from its first to its last
chunk over its tokens after the first) and end-to-end latency come from the SSE stream as the
client sees it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from ray_inference.bench.prompts import Workload


def percentile(values: list[float], q: float) -> float | None:
    """The value at rank q (0-1) of the sorted values, None for none (every p50/p90/p99 the
    benchmark prints, engine and full stack alike)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class LoadResult:
    concurrency: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    # Every client's first request arrives at once: a cold-start burst. The rest arrive one
    # by one as earlier answers end, the steady state that a busy cluster lives in.
    ttft_steady: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def record(self, started: float, first: float | None, last: float | None, tokens: int,
               cold: bool) -> None:
        """One answered request: submitted at `started`, its first and last chunks, how many
        tokens it got, whether it was its client's first request."""
        self.requests += 1
        self.tokens += tokens
        self.e2e.append(time.perf_counter() - started)
        if first is not None:
            self.ttft.append(first - started)
            if not cold:
                self.ttft_steady.append(first - started)
            if tokens > 1:  # per token: a chunk may carry several (the worker paces its streams)
                self.itl.append((last - first) / (tokens - 1))

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
            "tokens": self.tokens, "seconds": round(self.seconds, 3),
            "tok_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "req_s": round(self.requests / self.seconds, 3) if self.seconds else 0.0,
            **{f"{name}_p{int(q * 100)}_s": percentile(values, q)
               for name, values in (("ttft", self.ttft), ("ttft_steady", self.ttft_steady),
                                    ("itl", self.itl), ("e2e", self.e2e))
               for q in (0.5, 0.9, 0.99)},
            "ttft_mean_s": statistics.fmean(self.ttft) if self.ttft else None,
            "error_samples": self.error_samples[:5],
        }


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float | None,
                                                                           float | None, int]:
    """One streamed request: when its first and last chunks came, and how many tokens the
    final usage counted."""
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, last, tokens


async def _one(client: httpx.AsyncClient, url: str, body: dict, result: LoadResult,
               cold: bool) -> None:
    started = time.perf_counter()
    try:
        try:
            first, last, tokens = await _stream(client, url, body)
        except httpx.RemoteProtocolError as exc:
            # A kept-alive connection that the server closed as it was reused (llama.cpp's
            # server closes idle ones after 5 s, and httpx keeps them 5 s): nothing was
            # answered, so the request goes once more (the pool has dropped that connection),
            # its time counted from the first try. A second failure is an error.
            if "without sending a response" not in str(exc):
                raise
            first, last, tokens = await _stream(client, url, body)
    except Exception as exc:  # counted, sampled and reported, never fatal to the run
        result.errors += 1
        result.error_samples.append(str(exc)[:200])
        return
    result.record(started, first, last, tokens, cold)


async def run_load(url: str, model: str, concurrency: int, work: Workload,
                   api_key: str | None = None,
                   progress: Callable[[int], None] | None = None) -> LoadResult:
    # include_usage: OpenAI's way to ask for the token count that the last chunk carries
    # (rayinfer's gateway sends it anyway; llama.cpp's server only when asked).
    bodies = [{"model": model, "stream": True, "stream_options": {"include_usage": True},
               "ignore_eos": True, **work.sampling.request_fields(),
               "messages": messages, "max_tokens": length}
              for messages, length in zip(work.messages, work.lengths, strict=True)]
    result = LoadResult(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    queue = list(reversed(bodies))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5), headers=headers,
                                 limits=limits) as client:
        async def worker() -> None:
            cold = True
            while queue:
                await _one(client, url, queue.pop(), result, cold)
                cold = False
                if progress:
                    progress(1)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result
