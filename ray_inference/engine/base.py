"""What every engine shares: bounded admission, a worker thread, streams and counters.

Callers submit from any thread (an asyncio actor, a benchmark loop); the engine thread owns the
model and the batch, and pushes Chunks into each request's RequestStream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_inference.engine import huge_pages
from ray_inference.engine.openmp import release_calling_thread_team
from ray_inference.engine.types import Chunk, GenerationRequest
from ray_inference.errors import ContextLengthExceeded, InvalidRequest, Overloaded

log = logging.getLogger(__name__)


class Outbox:
    """Chunks for streams read on event loops, handed over once per engine step: each loop is
    woken once per step, not once per chunk (with a hundred rows, that is most of a step)."""

    def __init__(self):
        self.owner: int | None = None  # the engine thread; other threads hand over directly
        self._batches: dict[asyncio.AbstractEventLoop, list] = {}

    def add(self, loop: asyncio.AbstractEventLoop, target: asyncio.Queue, item) -> None:
        self._batches.setdefault(loop, []).append((target, item))

    def flush(self) -> None:
        batches, self._batches = self._batches, {}
        for loop, batch in batches.items():
            # A closed loop means the reader is gone: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list) -> None:
    for target, item in batch:
        target.put_nowait(item)


class RequestStream:
    """Chunks of one request, readable with `for` (threads) or `async for` (an event loop)."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None,
                 outbox: Outbox | None = None):
        self.request_id = request_id
        self._loop = loop
        self._outbox = outbox
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.finished = False

    def push(self, item: Chunk | BaseException) -> None:
        """Called by the engine thread."""
        if self._loop is None:
            self._queue.put(item)
        elif self._outbox is not None and self._outbox.owner == threading.get_ident():
            self._outbox.add(self._loop, self._queue, item)
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _ready(self, first: Any) -> list:
        """`first` and whatever else arrived meanwhile, up to the end of the stream."""
        items = [first]
        while not _ends(items[-1]):
            try:
                items.append(self._queue.get_nowait())
            except (queue.Empty, asyncio.QueueEmpty):
                break
        return items

    def _accept(self, items: list):
        """One chunk for everything that piled up (a slow reader catches up in one go), then
        the error, if the stream ended with one."""
        chunks = [i for i in items if not isinstance(i, BaseException)]
        if chunks:
            if chunks[-1].finish_reason is not None:
                self.finished = True
            yield merge_chunks(chunks)
        if isinstance(items[-1], BaseException):
            self.finished = True
            raise items[-1]

    def __iter__(self):
        while not self.finished:
            yield from self._accept(self._ready(self._queue.get()))

    def __aiter__(self):
        return self.paced(lambda: 0.0)

    async def paced(self, pause: Callable[[], float]):
        """Like `async for`, but after each chunk the next goes out with the first hand-over
        (the engine hands over at the end of every step, and after a prefill) at least
        `pause()` seconds later, carrying everything that arrived meanwhile. The first chunk
        and the end are never held. Sending only at hand-overs keeps the messages, and the
        Ray, gateway and client work they cause, together at a step's end instead of spread
        through the next step, and needs no timer per held chunk."""
        loop = asyncio.get_running_loop()
        send_at = 0.0
        while not self.finished:
            items = self._ready(await self._queue.get())
            while not _ends(items[-1]) and loop.time() < send_at:
                items += self._ready(await self._queue.get())
            for chunk in self._accept(items):
                yield chunk
            send_at = loop.time() + pause()


def _ends(item: Chunk | BaseException) -> bool:
    return isinstance(item, BaseException) or item.finish_reason is not None


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """Consecutive chunks of one request as one: text and tokens joined, the rest from the last."""
    if len(chunks) == 1:
        return chunks[0]
    return dataclasses.replace(chunks[-1], text="".join(c.text for c in chunks),
                               token_ids=[t for c in chunks for t in c.token_ids])


@dataclass
class Pending:
    """A validated request waiting for (or holding) a place in the batch."""

    request: GenerationRequest
    stream: RequestStream
    prompt_ids: list[int]
    max_new: int
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0

    @property
    def sequence(self) -> list[int]:
        """The tokens its row's K/V start from: the prompt, then any answer being resumed."""
        return self.prompt_ids + self.request.resume_ids

    @property
    def budget(self) -> int:
        return len(self.sequence) + self.max_new


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0
    requests: int = 0
    max_batch: int = 0
    kv_bytes_peak: int = 0
    admitted_between_layers: int = 0  # requests prefilled in the middle of a decode step
    prefix_tokens: int = 0  # prompt tokens not prefilled: their K/V came from the prefix cache
    packed_arrivals: int = 0  # requests prefilled inside a decode step (packing.py)
    joined_midstep: int = 0  # of those, requests that joined a step already running
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "requests": self.requests,
                "max_batch": self.max_batch, "kv_bytes_peak": self.kv_bytes_peak,
                "admitted_between_layers": self.admitted_between_layers,
                "prefix_tokens": self.prefix_tokens, "packed_arrivals": self.packed_arrivals,
                "joined_midstep": self.joined_midstep,
                "batch_sizes": dict(self.batch_sizes)}


def short_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch."))


class Engine:
    """Base class: subclasses implement `prepare_prompt` and `step`."""

    def __init__(self, loaded, config):
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.stats = EngineStats()
        self._waiting: collections.deque[Pending] = collections.deque()
        self._running: list[Pending] = []
        self._cancelled: set[str] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._outbox = Outbox()
        # The weights are in place: on a CPU their pages now become 2 MB ones (huge_pages.py).
        self.huge_page_bytes = (huge_pages.collapse_resident()
                                if config.huge_pages and loaded.device.type == "cpu" else 0)
        # The caller (who loaded the model) is done with torch: its OpenMP team would only
        # slow the engine thread's (see openmp.py).
        release_calling_thread_team()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{loaded.name}",
                                        daemon=True)
        self._thread.start()

    def numerics(self) -> str:
        """How the model computes, in short, for `rayinfer actors`: its dtype (causal
        engines add int8 layers and a KV cache in another dtype)."""
        return short_dtype(self.loaded.dtype)

    # ---- called from any thread -------------------------------------------------------
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
               ) -> RequestStream:
        """Validate and queue; raises InvalidRequest/Overloaded at once, never later."""
        prompt_ids = self.prepare_prompt(request)
        max_new = self._max_new_tokens(request, len(prompt_ids) + len(request.resume_ids))
        pending = Pending(request, RequestStream(request.request_id, loop, self._outbox), prompt_ids,
                          max_new)
        if pending.budget > self.config.max_tokens_in_flight:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_new}) exceeds this "
                f"worker's engine.max_tokens_in_flight ({self.config.max_tokens_in_flight})",
                "max_tokens")
        with self._wake:
            if self._stopping:
                raise Overloaded("this engine is shutting down", retry_after=1.0)
            if len(self._waiting) >= self.config.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting for "
                                 f"model {self.loaded.name}; retry shortly", retry_after=1.0)
            self._waiting.append(pending)
            self._wake.notify()
        return pending.stream

    def cancel(self, request_id: str) -> None:
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    def load(self) -> dict[str, int]:
        with self._wake:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---- shared helpers for subclasses -------------------------------------------------
    def prepare_prompt(self, request: GenerationRequest) -> list[int]:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def _max_new_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        context = self.loaded.context_length
        if prompt_len >= context:
            raise ContextLengthExceeded(
                f"the prompt has {prompt_len} tokens; model {self.loaded.name}'s context is "
                f"{context} tokens", "messages")
        room = context - prompt_len
        if request.max_tokens is None:
            return max(1, min(self.config.default_max_tokens, room) - len(request.resume_ids))
        if request.max_tokens <= 0:
            raise InvalidRequest("max_tokens must be at least 1", "max_tokens")
        if request.max_tokens > room + len(request.resume_ids):
            raise ContextLengthExceeded(
                f"prompt ({prompt_len} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                f"model {self.loaded.name}'s context of {context} tokens", "max_tokens")
        return max(1, request.max_tokens - len(request.resume_ids))

    def _render(self, request: GenerationRequest) -> tuple[str, bool]:
        """The prompt text, and whether special tokens must still be added by the tokenizer."""
        if request.messages:
            if self.loaded.has_chat_template:
                text = self.tokenizer.apply_chat_template(
                    request.messages, tokenize=False, add_generation_prompt=True)
                return text, False
            lines = [f"{m['role']}: {m['content']}" for m in request.messages]
            return "\n".join([*lines, "assistant:"]), True
        if request.prompt is None or not request.prompt.strip():
            raise InvalidRequest("the prompt is empty", "prompt")
        return request.prompt, True

    def _take_waiting(self, limit: int, budget_left: int) -> list[Pending]:
        taken: list[Pending] = []
        with self._wake:
            while self._waiting and len(taken) < limit:
                if self._waiting[0].budget > budget_left and (taken or self._running):
                    break
                pending = self._waiting.popleft()
                if pending.request.request_id in self._cancelled:
                    self._cancelled.discard(pending.request.request_id)
                    pending.stream.push(Chunk(pending.request.request_id, finish_reason="cancelled"))
                    continue
                budget_left -= pending.budget
                taken.append(pending)
            # Counted by load() and failed with the step from now on, not once placed.
            self._running = [*self._running, *taken]
        now = time.perf_counter()
        for pending in taken:
            pending.started_at = now
        return taken

    def _requeue(self, pending: list[Pending]) -> None:
        """Requests taken for a step that had no room for them: back to the queue's head."""
        with self._wake:
            self._running = [p for p in self._running if p not in pending]
            self._waiting.extendleft(reversed(pending))

    def _take_cancelled(self) -> set[str]:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, set()
        return cancelled

    def _finish(self, pending: Pending, reason: str, text: str = "", tokens: list[int] | None = None,
                completion_tokens: int = 0) -> None:
        now = time.perf_counter()
        self.stats.requests += 1
        pending.stream.push(Chunk(
            pending.request.request_id, text=text, token_ids=tokens or [], finish_reason=reason,
            prompt_tokens=len(pending.prompt_ids), completion_tokens=completion_tokens,
            queue_s=pending.started_at - pending.submitted_at,
            generation_s=now - pending.started_at, batch_size=len(self._running)))

    def _loop(self) -> None:
        self._outbox.owner = threading.get_ident()
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    if not self._wake.wait(self.idle_wait_s()):
                        self.release_idle()
                if self._stopping and not self._waiting and not self._running:
                    return
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as exc:  # a failed step must not leave callers waiting forever
                log.exception("engine step failed")
                self._fail_all(exc)
            finally:
                self._outbox.flush()

    def _fail_all(self, exc: Exception) -> None:
        with self._wake:
            victims = self._running + list(self._waiting)
            self._running, self._waiting = [], collections.deque()
        for pending in victims:
            pending.stream.push(RuntimeError(f"the engine failed: {exc}"))
        self.reset()

    def reset(self) -> None:
        """Forget batch state after a failure (subclasses drop their caches)."""

    def idle_wait_s(self) -> float | None:
        """How long the idle engine thread may sleep before `release_idle` is due; None: until
        a request comes."""
        return None

    def release_idle(self) -> None:
        """Free what an idle engine kept for the next requests (called on its thread)."""
