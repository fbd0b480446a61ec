"""Continuous batching for decoder-only models.

One batch runs step after step. Waiting requests are prefilled together (left-padded) at the
start of a step and merged into the running batch's KV cache; finished rows leave at the end of
the step, and padding columns nobody needs any more are trimmed. Each row keeps its own position
ids and sampling settings, so requests of any length and temperature share every forward pass.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ray_inference.engine.base import Engine, Pending
from ray_inference.engine.sampling import SamplingParams, sample
from ray_inference.engine.text import TextTracker
from ray_inference.engine.types import Chunk, GenerationRequest
from ray_inference.errors import InvalidRequest

# Padding columns on the left are cut once this many are unused by every row (a whole-cache copy).
TRIM_COLUMNS = 32
_GREEDY = SamplingParams(temperature=0.0)
# Prefill at most this many prompt tokens per step, so running rows keep decoding while a burst
# of new requests is admitted.
MAX_PREFILL_TOKENS = 4096


@dataclass
class _Row:
    pending: Pending
    params: SamplingParams
    text: TextTracker
    generated: list[int] = field(default_factory=list)
    first_token_at: float = 0.0


class CausalEngine(Engine):
    def __init__(self, loaded, config):
        self._model = loaded.model
        self._device = loaded.device
        self._eos = self._eos_ids(loaded)
        self._pad_id = loaded.tokenizer.pad_token_id or 0
        accepted = inspect.signature(self._model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in accepted
        # transformers 5.x renamed past_key_values to cache; older models keep the old name.
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, columns): 1 for real tokens
        self._positions: torch.Tensor | None = None  # next position id per row
        self._last: torch.Tensor | None = None  # last sampled token per row
        super().__init__(loaded, config)

    @staticmethod
    def _eos_ids(loaded) -> set[int]:
        ids = set()
        for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def prepare_prompt(self, request: GenerationRequest) -> list[int]:
        text, add_special = self._render(request)
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        if not ids:
            raise InvalidRequest("the prompt is empty after tokenization",
                                 "messages" if request.messages else "prompt")
        return ids

    # ---- the engine thread ---------------------------------------------------------------
    def step(self) -> None:
        self._drop_cancelled()
        live = self._live()
        budget_left = self.config.max_tokens_in_flight - sum(r.pending.budget for r in live)
        room = self.config.max_batch_size - len(live)
        admitted = self._take_waiting(room, budget_left) if room > 0 else []
        if admitted:
            self._prefill(admitted)
        if self._live():
            self._decode()
        self._compact()

    def _live(self) -> list[_Row]:
        return [r for r in self._rows if r is not None]

    def _forward(self, input_ids, mask, positions, cache):
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        extra[self._cache_arg] = cache
        out = self._model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **extra)
        returned = out.get("cache", None) or out.get("past_key_values", None)
        return out.logits[:, -1, :], returned

    def _prefill(self, admitted: list[Pending]) -> None:
        # A burst larger than MAX_PREFILL_TOKENS goes back to the queue's head for the next step.
        batch, total = [], 0
        for pending in admitted:
            length = len(pending.prompt_ids) + len(pending.request.resume_ids)
            if batch and total + length > MAX_PREFILL_TOKENS:
                break
            batch.append(pending)
            total += length
        if len(batch) < len(admitted):
            with self._wake:
                self._waiting.extendleft(reversed(admitted[len(batch):]))
        sequences = [p.prompt_ids + p.request.resume_ids for p in batch]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache())
        rows = [self._new_row(p) for p in batch]
        tokens = sample(logits, [r.params for r in rows])
        self.stats.steps += 1
        keep = self._emit(rows, tokens.tolist())
        if not keep:
            return
        index = torch.tensor(keep, device=self._device)
        self._place([rows[i] for i in keep], _select(cache, index), mask.index_select(0, index),
                    mask.sum(-1).index_select(0, index), tokens.index_select(0, index))

    def _new_row(self, pending: Pending) -> _Row:
        request = pending.request
        params = SamplingParams.create(request.temperature, request.top_p, request.seed,
                                       self._device)
        tracker = TextTracker(self.tokenizer, request.stop, request.resume_ids)
        return _Row(pending, params, tracker)

    def _place(self, rows, cache, mask, positions, last) -> None:
        """Put freshly prefilled rows into the running batch: into the slots of rows that left
        (copying only the new rows), and append the rest. The running cache is copied whole
        only when a new prompt is wider than the batch or the batch grows."""
        if self._cache is None:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            self._positions, self._last = positions, last
            self._running = [r.pending for r in rows]
            return
        width = self._mask.shape[1]
        if mask.shape[1] > width:
            self._cache, self._mask = _pad_left(self._cache, self._mask, mask.shape[1])
        elif mask.shape[1] < width:
            cache, mask = _pad_left(cache, mask, width)
        holes = [i for i, r in enumerate(self._rows) if r is None]
        reused = min(len(holes), len(rows))
        if reused:
            slots = torch.tensor(holes[:reused], device=self._device)
            for (k, v), (nk, nv) in zip(_layers(self._cache), _layers(cache), strict=True):
                k.index_copy_(0, slots, nk[:reused])
                v.index_copy_(0, slots, nv[:reused])
            self._mask.index_copy_(0, slots, mask[:reused])
            self._positions.index_copy_(0, slots, positions[:reused])
            self._last.index_copy_(0, slots, last[:reused])
            for slot, row in zip(holes, rows[:reused], strict=False):
                self._rows[slot] = row
        if reused < len(rows):
            rest = torch.arange(reused, len(rows), device=self._device)
            self._cache = _concat(self._cache, _select(cache, rest))
            self._mask = torch.cat([self._mask, mask[reused:]])
            self._positions = torch.cat([self._positions, positions[reused:]])
            self._last = torch.cat([self._last, last[reused:]])
            self._rows = self._rows + list(rows[reused:])
        self._running = [r.pending for r in self._live()]

    def _decode(self) -> None:
        ones = torch.ones((len(self._rows), 1), dtype=torch.long, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        logits, self._cache = self._forward(self._last[:, None], self._mask,
                                            self._positions[:, None], self._cache)
        tokens = sample(logits, [r.params if r else _GREEDY for r in self._rows])
        # Idle slots keep counting too; the clamp keeps them inside the position table.
        self._positions = (self._positions + 1).clamp_(max=self.loaded.context_length - 1)
        self._last = tokens
        self.stats.steps += 1
        live = len(self._live())
        self.stats.batch_sizes[live] += 1
        self.stats.max_batch = max(self.stats.max_batch, live)
        keep = set(self._emit(self._rows, tokens.tolist()))
        for i, row in enumerate(self._rows):
            if row is not None and i not in keep:
                self._free(i)

    def _emit(self, rows: list[_Row], tokens: list[int]) -> list[int]:
        """Send each row's token; returns the indexes of rows that go on."""
        now = time.perf_counter()
        keep = []
        self._running = [r.pending for r in rows if r]  # for batch_size in chunks and load()
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row is None:
                continue
            pending = row.pending
            if not row.first_token_at:
                row.first_token_at = now
            reason = None
            delta = ""
            if token in self._eos and not pending.request.ignore_eos:
                reason = "stop"
            else:
                row.generated.append(token)
                self.stats.tokens += 1
                delta = row.text.add(token)
                if row.text.stopped:
                    reason = "stop"
                elif len(row.generated) >= pending.max_new:
                    reason = "length"
            if reason is None:
                pending.stream.push(Chunk(pending.request.request_id, text=delta,
                                          token_ids=[token]))
                keep.append(i)
                continue
            delta += row.text.flush()
            ids = [] if reason == "stop" and token in self._eos else [token]
            self._finish(pending, reason, delta, ids,
                         len(row.generated) + len(pending.request.resume_ids))
        return keep

    def _drop_cancelled(self) -> None:
        cancelled = self._take_cancelled()
        if not cancelled:
            return
        with self._wake:  # cancelled while still waiting
            for pending in [p for p in self._waiting if p.request.request_id in cancelled]:
                self._waiting.remove(pending)
                pending.stream.push(Chunk(pending.request.request_id, finish_reason="cancelled"))
        gone = [(i, r) for i, r in enumerate(self._rows)
                if r is not None and r.pending.request.request_id in cancelled]
        for i, _ in gone:
            self._free(i)
        self._running = [r.pending for r in self._live()]
        for _, row in gone:  # told only once the slot is free, so load() is already right
            row.pending.stream.push(Chunk(row.pending.request.request_id,
                                          finish_reason="cancelled"))

    def _free(self, slot: int) -> None:
        """A row left: its slot stays in the batch, masked, until a new request takes it."""
        self._rows[slot] = None
        self._mask[slot] = 0
        self._mask[slot, -1] = 1  # one visible column keeps attention finite for the idle row

    def _compact(self) -> None:
        """Copy the batch down only when it pays: many idle slots and nobody waiting for
        them, or a wide band of padding on the left that no row needs any more."""
        live = [i for i, r in enumerate(self._rows) if r is not None]
        if not live:
            self.reset()
            return
        with self._wake:
            waiting = len(self._waiting)
        idle = len(self._rows) - len(live)
        if idle and not waiting and idle * 4 >= len(self._rows):
            self._keep_rows(live)
            return
        used = self._mask.index_select(0, torch.tensor(live, device=self._device)).sum(0)
        first = int(used.nonzero()[0]) if bool(used.any()) else 0
        if first >= TRIM_COLUMNS:
            self._cache = _slice(self._cache, first)
            self._mask = self._mask[:, first:]

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self._device)
        self._rows = [self._rows[i] for i in keep]
        self._running = [r.pending for r in self._rows]
        self._cache = _select(self._cache, index)
        self._mask = self._mask.index_select(0, index)
        self._positions = self._positions.index_select(0, index)
        self._last = self._last.index_select(0, index)
        # Columns that are padding in every remaining row cost attention time: cut them.
        used = self._mask.sum(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self._cache = _slice(self._cache, first)
            self._mask = self._mask[:, first:]

    def reset(self) -> None:
        self._rows, self._running = [], []
        self._cache = self._mask = self._positions = self._last = None


def _layers(cache: DynamicCache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    return DynamicCache([(k.index_select(0, index), v.index_select(0, index))
                         for k, v in _layers(cache)])


def _slice(cache: DynamicCache, first: int) -> DynamicCache:
    return DynamicCache([(k[:, :, first:], v[:, :, first:]) for k, v in _layers(cache)])


def _pad_left(cache: DynamicCache, mask: torch.Tensor, width: int):
    extra = width - mask.shape[1]
    if extra == 0:
        return cache, mask
    padded = DynamicCache([(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0)))
                           for k, v in _layers(cache)])
    return padded, F.pad(mask, (extra, 0))


def _concat(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    return DynamicCache([(torch.cat([ka, kb]), torch.cat([va, vb]))
                         for (ka, va), (kb, vb) in zip(_layers(a), _layers(b), strict=True)])
