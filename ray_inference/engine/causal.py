"""Continuous batching for decoder-only models.

One batch runs step after step. Waiting requests are prefilled together (left-padded) at the
start of a step and written into free slots of the batch's KV cache (see kv.py) so that their
prompts end at the current column; finished rows leave their slot to the next request. Each row
keeps its own position ids and sampling settings, so requests of any length and temperature
share every forward pass. On a GPU the decode step is replayed as a CUDA graph (graphs.py).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ray_inference.engine import int4, lean, packing, prepack, quantize, sdpa
from ray_inference.engine.base import Engine, Pending, short_dtype
from ray_inference.engine.graphs import MIN_COLUMNS, MIN_ROWS, DecodeGraphs, bucket
from ray_inference.engine.kv import COLUMN_CHUNK, SlotKV
from ray_inference.engine.prefix import PrefixCache
from ray_inference.engine.sampling import SamplingParams, sample
from ray_inference.engine.text import TextTracker
from ray_inference.engine.types import Chunk, GenerationRequest
from ray_inference.errors import InvalidRequest

log = logging.getLogger(__name__)
_GREEDY = SamplingParams(temperature=0.0)
# Where arrivals are packed, one that comes while a lean step runs its first half of layers
# joins that step (its prompt runs those layers alone); a later one waits for the next step.
JOIN_WITHIN = 0.5


@dataclass
class _Launched:
    """A decode step whose tokens have not been handed out yet."""

    rows: list  # the batch's rows when the step was launched
    tokens: torch.Tensor  # one per row, then one per arrival
    ready: torch.cuda.Event | None = None
    arrivals: list = field(default_factory=list)  # (slot, row) of prompts packed into the step


@dataclass
class _Prefilled:
    """Freshly prefilled rows, not yet written into the batch's cache."""

    rows: list
    layers: list  # per layer: (keys, values) of these rows only
    mask: torch.Tensor
    lengths: list[int]
    last: torch.Tensor  # each row's first sampled token


@dataclass
class _Row:
    pending: Pending
    params: SamplingParams
    text: TextTracker
    start: int = 0  # the column of the row's first real token
    generated: list[int] = field(default_factory=list)
    first_token_at: float = 0.0


class CausalEngine(Engine):
    def __init__(self, loaded, config):
        self._model = loaded.model
        self._device = loaded.device
        self._dtype = loaded.dtype
        self._eos = self._eos_ids(loaded)
        self._pad_id = loaded.tokenizer.pad_token_id or 0
        accepted = inspect.signature(self._model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in accepted
        self._cache_arg = cache_keyword(self._model)
        self._rows: list[_Row | None] = []
        self._kv: SlotKV | None = None
        self._emptied_at = 0.0  # when the batch last emptied (monotonic), see reset()
        self._column = 0  # the column the next decode step writes, shared by every slot
        self._positions: torch.Tensor | None = None  # next position id per slot
        self._last: torch.Tensor | None = None  # last sampled token per slot
        # Decode steps run packing.py's attention, which reads each K/V head once
        # (transformers' SDPA path would copy K/V per query head group for a masked step).
        self._grouped_query = packing.supported(self._model)
        if self._grouped_query:
            packing.enable(self._model)
        self._kv_dtype = self._kv_cache_dtype(config.kv_cache_dtype)
        self._graphs = (DecodeGraphs(self._forward, self._kv_dtype)
                        if self._device.type == "cuda" and config.cuda_graphs else None)
        overlap = config.overlap_steps
        self._overlap = self._device.type == "cuda" if overlap is None else overlap
        self._launched: _Launched | None = None
        self._prefixes = PrefixCache() if config.prefix_cache else None
        # Before the rewrites below, which take each layer's weight apart: the copies are made
        # from it, and each copy's layer for many rows is then packed or quantized in turn.
        self._int4_rows, self._int4_copies = self._add_int4_copies(config.int4_max_rows)
        self._quantized = self._quantize(config.quantize)
        kernel = "auto" if config.prepack_weights is True else config.prepack_weights
        self._prepacked = (prepack.pack(self._model, kernel) if kernel
                           and prepack.supported(self._device, self._dtype) else 0)
        self._prepack_kernel = prepack.kernel_of(self._model) if self._prepacked else None
        # Settled CPU steps go through it as packed steps, with room for arrivals' prompts.
        self._packed_steps = (self._device.type == "cpu" and not self._overlap
                              and self._graphs is None and self._grouped_query)
        # Those steps call the layers' modules directly where the model is Llama-shaped.
        self._lean = (lean.LeanDecoder(self._model)
                      if config.lean_decode and self._packed_steps and lean.supported(self._model)
                      else None)
        # Arrivals ride in the running batch's next decode step once it runs this many rows.
        self._pack_from = _pack_from(config.pack_arrivals) if self._packed_steps else None
        # Otherwise arrivals during an eager decode step are prefilled at the next layer
        # boundary (at most once per step) and join the batch when the step ends.
        self._layer_hooks = []
        self._armed = False
        self._prefilled_midstep: _Prefilled | None = None
        if config.admit_between_layers and not self._overlap and self._pack_from != 1:
            self._layer_hooks = [layer.register_forward_hook(self._layer_done)
                                 for layer in _decoder_layers(self._model)]
        # A row never spans more columns than its prompt plus its new tokens.
        self._max_columns = min(loaded.context_length, config.max_tokens_in_flight) + 1
        super().__init__(loaded, config)

    def _quantize(self, scheme: str) -> int:
        if scheme == "none":
            return 0
        if not quantize.supported(self._device):
            log.warning("engine.quantize: %s runs on CPU workers only; this %s worker keeps the "
                        "model's %s weights", scheme, self._device.type, self._dtype)
            return 0
        return quantize.quantize(self._model)

    def _add_int4_copies(self, setting: int | str) -> tuple[int, int]:
        """The most rows a product runs on 4-bit copies, and how many layers have one."""
        if setting == 0:
            return 0, 0
        if self._device.type != "cpu":
            if setting != "auto":
                log.warning("engine.int4_max_rows: %s runs on CPU workers only; this %s worker "
                            "makes no 4-bit copies", setting, self._device.type)
            return 0, 0
        if setting == "auto":
            rows = int4.AUTO_MAX_ROWS.get(self._dtype)  # measured against fp32's and bf16's
            if rows is None:
                return 0, 0
            copies = int4.add_copies(self._model, rows, only_exact=True)
        else:
            rows, copies = setting, int4.add_copies(self._model, setting, only_exact=False)
        return (rows, copies) if copies else (0, 0)

    def _kv_cache_dtype(self, name: str) -> torch.dtype:
        """The dtype the slots' K/V are stored in: the model's, or the one asked for where
        decode steps run the engine's own attention (which casts the query to it)."""
        if name == "auto":
            return self._dtype
        if not self._grouped_query:
            log.warning("engine.kv_cache_dtype: %s needs a model whose attention runs SDPA "
                        "through transformers' attention interface; this one keeps %s K/V",
                        name, self._dtype)
            return self._dtype
        return getattr(torch, name)

    def numerics(self) -> str:
        """The model's dtype, then "int8" when its linear layers run in int8, "int4<=16" when
        products of up to 16 rows run on 4-bit copies, and "kv:bf16" when the KV cache keeps
        another dtype: "fp32 int8 int4<=16 kv:bf16"."""
        parts = [super().numerics()] + (["int8"] if self._quantized else [])
        if self._int4_copies:
            parts.append(f"int4<={self._int4_rows}")
        if self._kv_dtype != self._dtype:
            parts.append(f"kv:{short_dtype(self._kv_dtype)}")
        return " ".join(parts)

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

    def describe(self) -> dict:
        """What the engine runs on, for logs and benchmarks."""
        kv = self._kv  # read once: the engine thread may free it meanwhile
        info = {"kv_bytes": kv.nbytes if kv else 0,
                "cuda_graphs": self._graphs is not None, "grouped_query_steps": self._grouped_query,
                "packed_steps": self._packed_steps, "lean_decode": self._lean is not None,
                "pack_arrivals": self.config.pack_arrivals if self._pack_from else False,
                "prepacked_linears": self._prepacked,
                "prepack_kernel": self._prepack_kernel,
                "int8_linears": self._quantized,
                "int4_linears": self._int4_copies, "int4_max_rows": self._int4_rows,
                "kv_dtype": str(self._kv_dtype).removeprefix("torch."),
                "huge_page_bytes": self.huge_page_bytes}
        if self._graphs is not None:
            info.update(graph_captures=self._graphs.captures, graph_replays=self._graphs.replays)
        return info

    # ---- the engine thread ---------------------------------------------------------------
    def step(self) -> None:
        self._drop_cancelled()
        admitted = self._admissible()
        joining: list[Pending] = []
        if admitted:
            self._settle_launched()
            if self._packs_arrivals():
                joining = self._within_prefill_budget(admitted)
            else:
                prefilled = self._prefill(admitted)
                self._outbox.flush()  # first tokens go out now, not after this step's decode
                if prefilled:
                    self._place(prefilled)
        if self._live():
            self._decode(joining)
        if self._prefilled_midstep:
            prefilled, self._prefilled_midstep = self._prefilled_midstep, None
            self._place(prefilled)
        self._compact()

    def _packs_arrivals(self) -> bool:
        """Whether requests admitted now ride in the batch's next decode step."""
        return self._pack_from is not None and len(self._live()) >= self._pack_from

    def _admissible(self) -> list[Pending]:
        """Waiting requests that fit the batch's free rows and token budget."""
        live = self._live()
        budget_left = self.config.max_tokens_in_flight - sum(r.pending.budget for r in live)
        room = self.config.max_batch_size - len(live)
        return self._take_waiting(room, budget_left) if room > 0 else []

    def _layer_done(self, module, args, output) -> None:
        """Forward hook of every decoder layer. On a CPU a decode step takes 40-100 ms; a
        request that arrives meanwhile is prefilled here (the step's later layers wait) and its
        first token goes out at once, instead of after the rest of the step."""
        if not (self._armed and self._waiting) or self._packs_arrivals():
            return  # a batch this large packs the arrival into its next step instead
        self._armed = False  # the prefill's own forward passes these hooks too
        admitted = self._admissible()
        if not admitted:
            return
        self._prefilled_midstep = self._prefill(admitted)
        self.stats.admitted_between_layers += len(admitted)
        self._outbox.flush()

    def _live(self) -> list[_Row]:
        return [r for r in self._rows if r is not None]

    def _forward(self, input_ids, mask, positions, cache):
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        extra[self._cache_arg] = cache
        out = self._model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **extra)
        return out.logits[:, -1, :]

    def _within_prefill_budget(self, admitted: list[Pending]) -> list[Pending]:
        """The admitted requests whose prompts fit one step's prefill budget; the rest go back
        to the queue's head for the next step."""
        batch, total = [], 0
        for pending in admitted:
            length = len(pending.sequence)
            if batch and total + length > self.config.max_prefill_tokens:
                break
            batch.append(pending)
            total += length
        if len(batch) < len(admitted):
            self._requeue(admitted[len(batch):])
        return batch

    def _prefill(self, admitted: list[Pending]) -> _Prefilled | None:
        batch = self._within_prefill_budget(admitted)
        sequences = [p.sequence for p in batch]
        hit = self._prefixes.match(sequences) if self._prefixes is not None else None
        skip = hit[0] if hit else 0  # prompt tokens whose K/V come from the prefix cache
        self.stats.prefix_tokens += skip * len(batch)
        width = max(len(s) for s in sequences) - skip
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) + skip:] = torch.tensor(seq[skip:])
            mask[i, width - len(seq) + skip:] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = skip + (mask.cumsum(-1) - 1).clamp(min=0)
        if hit:  # every row: [cached prefix | its padding | the rest of its prompt]
            cache = DynamicCache(ddp_cache_data=[
                (keys.expand(len(batch), -1, -1, -1), values.expand(len(batch), -1, -1, -1))
                for keys, values in hit[1]])
            mask = torch.cat([mask.new_ones(len(batch), skip), mask], dim=1)
        else:
            cache = DynamicCache()
        with sdpa.new_shape_backends(self._device):
            logits = self._forward(ids, mask, positions, cache)
        if self._prefixes is not None and not hit:
            start = int(mask[0].argmax())  # the first row holds it, after its left padding
            self._remember_prefix(sequences, [(layer.keys[:1], layer.values[:1])
                                              for layer in cache.layers], start)
        rows = [self._new_row(p) for p in batch]
        tokens = sample(logits, [r.params for r in rows])
        self.stats.steps += 1
        self._set_running([*self._live(), *rows])
        keep = self._emit(rows, tokens.tolist())
        if not keep:
            return None
        lengths = [len(sequences[i]) for i in keep]
        index = torch.tensor(keep, device=self._device)
        mask = mask.index_select(0, index)
        # Columns that are padding in every kept row are not stored.
        first = int(mask.argmax(dim=1).min())
        layers = [(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                  for layer in cache.layers]
        return _Prefilled([rows[i] for i in keep], layers, mask[:, first:], lengths,
                          tokens.index_select(0, index))

    def _remember_prefix(self, sequences: list[list[int]], layers, start: int) -> None:
        """Offer fully prefilled prompts to the prefix cache; a prefix it wants is cut out of
        their own K/V: `layers` holds (keys, values) of one of them, starting at `start`."""
        prefix = self._prefixes.candidate(sequences)
        if prefix is None:
            return
        end = start + len(prefix)
        # In the model's dtype: a prefill runs its prompt's rest on top of it.
        self._prefixes.add(prefix, [(keys[:, :, start:end].to(self._dtype, copy=True),
                                     values[:, :, start:end].to(self._dtype, copy=True))
                                    for keys, values in layers])

    def _new_row(self, pending: Pending) -> _Row:
        request = pending.request
        params = SamplingParams.create(request.temperature, request.top_p, request.seed)
        tracker = TextTracker(self.tokenizer, request.stop, request.resume_ids)
        return _Row(pending, params, tracker)

    def _allocate(self, layers, slots: int, columns: int) -> None:
        keys = layers[0][0]
        if self._graphs is not None:  # graphs want the slot count fixed from the start
            slots = self.config.max_batch_size
        self._kv = SlotKV(len(layers), keys.shape[1], keys.shape[3], self._kv_dtype, self._device,
                          slots, columns, self._max_columns + COLUMN_CHUNK,
                          self.config.huge_pages)
        self._positions = torch.zeros(slots, dtype=torch.long, device=self._device)
        self._last = torch.zeros(slots, dtype=torch.long, device=self._device)
        self.stats.kv_bytes_peak = max(self.stats.kv_bytes_peak, self._kv.nbytes)

    def _columns_for(self, needed: int) -> int:
        if self._graphs is not None:
            return bucket(needed, MIN_COLUMNS)
        return -(-needed // COLUMN_CHUNK) * COLUMN_CHUNK

    def _place(self, prefilled: _Prefilled) -> None:
        """Write freshly prefilled rows into free slots so that their prompts end at the
        current column; the batch grows only when no slot is free."""
        rows, lengths = prefilled.rows, prefilled.lengths
        width = prefilled.mask.shape[1]
        if self._kv is None:
            self._allocate(prefilled.layers, len(rows), self._columns_for(width + 1))
        if not self._live():
            self._rows, self._column = [], 0
        if self._column < width:  # the new prompt is longer than the batch's history
            self._make_room(width + 1, shift=self._column - width)
        slots = self._free_slots(len(rows))
        index = torch.tensor(slots, device=self._device)
        self._kv.write_rows(index, self._column, prefilled.layers, prefilled.mask)
        self._positions.index_copy_(0, index, torch.tensor(lengths, device=self._device))
        self._last.index_copy_(0, index, prefilled.last)
        # A row's first column is its first valid one (a prompt from the prefix cache has
        # padding between the prefix and the rest, so its span can exceed its length).
        firsts = prefilled.mask.argmax(dim=1).tolist()
        for slot, row, first in zip(slots, rows, firsts, strict=True):
            row.start = self._column - width + first
            self._rows[slot] = row
        self._running = [r.pending for r in self._live()]
        if self._graphs is not None:
            self._reserve_columns(rows)

    def _reserve_columns(self, rows: list[_Row]) -> None:
        """Graphs are captured against the cache's buffers, and a cache that grows drops every
        one of them (a recapture per bucket the batch goes through again). So when rows join,
        the cache makes room for their whole budgets at once, while that stays within
        `max_tokens_in_flight` over all slots; past that it grows step by step as before."""
        reach = self._column + max(r.pending.max_new - len(r.generated) for r in rows)
        columns = min(self._columns_for(reach), self._kv.max_columns)
        if (columns > self._kv.columns
                and columns * self._kv.slots <= self.config.max_tokens_in_flight):
            self._grow(columns=columns)

    def _free_slots(self, count: int) -> list[int]:
        """Slots for `count` new rows: the batch's holes first, then new slots at its end
        (the cache grows only then)."""
        holes = [i for i, r in enumerate(self._rows) if r is None][:count]
        slots = holes + list(range(len(self._rows), len(self._rows) + count - len(holes)))
        needed = max(slots) + 1
        if needed > self._kv.slots:
            self._grow(slots=max(needed, 2 * self._kv.slots))
        self._rows += [None] * (needed - len(self._rows))
        return slots

    def _grow(self, slots: int = 0, columns: int = 0) -> None:
        old = self._kv.slots
        self._kv.grow(min(slots, self.config.max_batch_size) if slots else 0, columns)
        if self._kv.slots > old:
            extra = self._kv.slots - old
            self._positions = torch.cat([self._positions, self._positions.new_zeros(extra)])
            self._last = torch.cat([self._last, self._last.new_zeros(extra)])
        self.stats.kv_bytes_peak = max(self.stats.kv_bytes_peak, self._kv.nbytes)

    def _make_room(self, columns: int, shift: int = 0) -> None:
        """Move every column by -shift, then make the cache at least `columns` wide."""
        if shift < 0:
            self._grow(columns=self._columns_for(self._column - shift + 1))
        self._kv.shift(shift, self._column)
        self._column -= shift
        for row in self._live():
            row.start -= shift
        if columns > self._kv.columns:
            self._grow(columns=self._columns_for(columns))

    def _decode(self, joining: list[Pending] = ()) -> None:
        """One token for every row of the batch; `joining` requests (eager steps only) are
        prefilled in the same pass and get their first token from it."""
        batch = list(self._rows)  # arrivals may take free slots among these rows
        arrivals: list[tuple[int, _Row]] = []
        if self._graphs is not None:
            first = min(r.start for r in self._live())
            rows = min(bucket(len(self._rows), MIN_ROWS), self._kv.slots)
            # Graphs attend from column 0: shift history down when that saves a bucket.
            if first and bucket(self._column + 1 - first, MIN_COLUMNS) < bucket(
                    self._column + 1, MIN_COLUMNS):
                self._make_room(0, shift=first)
            columns = bucket(self._column + 1, MIN_COLUMNS)
            if columns > self._kv.columns:
                self._grow(columns=columns)
            self._kv.valid[:rows, self._column] = True
            try:
                logits = self._graphs.step(self._kv, rows, columns, self._last, self._positions,
                                           self._column)
            except RuntimeError:
                log.exception("CUDA graph capture failed; decoding without graphs from now on")
                self._graphs = None
        if self._graphs is None:
            rows = len(batch)
            if self._column >= self._kv.columns:
                first = min(r.start for r in self._live())
                self._make_room(self._column + 1 - first, shift=first)
            seated = [self._seat(pending) for pending in joining]
            first = min(r.start for r in batch if r is not None)
            self._kv.valid[:rows, self._column] = True
            end = self._column + 1
            mask = self._kv.attention_mask(rows, first, end, self._kv_dtype)
            self._armed = bool(self._layer_hooks)
            try:
                if self._packed_steps:
                    logits = self._packed_forward(rows, first, mask, seated)
                else:
                    logits = self._forward(self._last[:rows, None], mask,
                                           self._positions[:rows, None],
                                           self._kv.view(rows, first, end, self._column))
            finally:
                self._armed = False
            arrivals = [(slot, row) for slot, row, _, _ in seated]  # with any that joined
        self._column += 1
        count = len(batch)
        tokens = sample(logits[:count + len(arrivals)],
                        [r.params if r else _GREEDY for r in batch]
                        + [row.params for _, row in arrivals])
        # Idle slots keep counting too; the clamp keeps them inside the position table.
        self._positions[:count] = (self._positions[:count] + 1).clamp_(
            max=self.loaded.context_length - 1)
        self._last[:count] = tokens[:count]
        if arrivals:
            self._joined(seated, tokens[count:])
        self.stats.steps += 1
        live = len(self._live())
        self.stats.batch_sizes[live] += 1
        self.stats.max_batch = max(self.stats.max_batch, live)
        if not self._overlap:
            self._settle(_Launched(batch, tokens, arrivals=arrivals))
            return
        # The next step only needs `_last` and `_positions`, which stay on the device: settle
        # the previous step (text, streams, finished rows) while this one runs.
        launched = _Launched(batch, tokens.to("cpu", non_blocking=True))
        if self._device.type == "cuda":
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        previous, self._launched = self._launched, launched
        if previous is not None:
            self._settle(previous)

    def _settle(self, launched: _Launched) -> None:
        """Hand out a step's tokens. Rows that left since it was launched are skipped (their
        extra token is dropped); nobody took their slot, since admission settles first."""
        if launched.ready is not None:
            launched.ready.synchronize()
        # (slot, row) per token: the step's rows, then the arrivals packed into it.
        seats = [(i, row if i < len(self._rows) and self._rows[i] is row else None)
                 for i, row in enumerate(launched.rows)] + launched.arrivals
        rows = [row for _, row in seats]
        self._set_running(rows)
        keep = set(self._emit(rows, launched.tokens.tolist()))
        for j, (slot, row) in enumerate(seats):
            if row is not None and j not in keep:
                self._free(slot)

    def _seat(self, pending: Pending) -> tuple[int, _Row, list[int], tuple | None]:
        """Give a request packed into this step a slot and a span of columns that ends at the
        step's column: (slot, row, its sequence, its prefix cache hit)."""
        sequence = pending.sequence
        hit = self._prefixes.match([sequence]) if self._prefixes is not None else None
        span = len(sequence)
        if self._column + 1 < span:  # the prompt is longer than the batch's history
            self._make_room(span + 1, shift=self._column + 1 - span)
        slot = self._free_slots(1)[0]
        row = self._new_row(pending)
        row.start = self._column + 1 - span
        self._rows[slot] = row
        return slot, row, sequence, hit

    def _packed_forward(self, rows: int, first: int, mask: torch.Tensor, seated) -> torch.Tensor:
        """The decode step of `rows` slots, with the seated requests' prompts (if any) packed
        in: logits of every slot, then of each arrival's last prompt token. On the lean path
        requests that arrive during the step's first layers join it (`_join_midstep`)."""
        plan = packing.PackedPlan(rows, first, self._column, mask, [])
        ids, positions = self._pack(plan, seated)
        ids = torch.cat([self._last[:rows], ids])
        positions = torch.cat([self._positions[:rows], positions])
        cache = packing.packed_cache(self._kv.keys, self._kv.values, plan)
        if self._lean is not None:
            join = (functools.partial(self._join_midstep, plan, seated)
                    if self._pack_from is not None else None)
            return self._lean.forward(ids, positions, cache, plan, join)
        keep = plan.keep(self._device)
        extra = {self._cache_arg: cache, packing.PLAN: plan}
        if self._keep_last_logits:
            extra["logits_to_keep"] = keep
        # A 4D mask makes transformers skip building its own; packed attention ignores it.
        out = self._model(input_ids=ids[None], attention_mask=mask[:1, :, :, :1],
                          position_ids=positions[None], use_cache=True, **extra)
        return out.logits[0] if self._keep_last_logits else out.logits[0, keep]

    def _pack(self, plan: packing.PackedPlan, seated) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the seated requests to `plan` as arrivals, after those it has (their cached
        prefixes copied into their slots): the token ids and positions they add to the step."""
        ids, positions = [], []
        offset = plan.arrival_tokens
        for slot, row, sequence, hit in seated:  # seated: columns no longer move this step
            skip = hit[0] if hit else 0
            if hit:
                for keys, values, (prefix_keys, prefix_values) in zip(
                        self._kv.keys, self._kv.values, hit[1], strict=True):
                    keys[slot, :, row.start:row.start + skip] = prefix_keys[0]
                    values[slot, :, row.start:row.start + skip] = prefix_values[0]
            self._kv.valid[slot] = False
            self._kv.valid[slot, row.start:self._column + 1] = True
            self.stats.prefix_tokens += skip
            new = sequence[skip:]
            plan.arrivals.append(packing.Arrival(
                slot, offset, len(new), row.start,
                packing.arrival_mask(skip, len(new), self._device)))
            ids += new
            positions += range(skip, len(sequence))
            offset += len(new)
        return (torch.tensor(ids, dtype=torch.long, device=self._device),
                torch.tensor(positions, dtype=torch.long, device=self._device))

    def _join_midstep(self, plan: packing.PackedPlan, seated: list,
                      done: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Between layers of a lean packed step: requests that arrived while it runs its first
        half of layers are seated now, their prompts run those `done` layers alone, and they
        ride the rest of the step, first token included. Later arrivals, and those that would
        need the cache to grow or its columns to move, wait for the next step."""
        if (not self._waiting or done > len(self._kv.keys) * JOIN_WITHIN
                or not self._packs_arrivals()):
            return None
        joining, later = [], []
        for pending in self._within_prefill_budget(self._admissible()):
            if len(pending.sequence) <= self._column + 1 and self._has_free_slot():
                joining.append(self._seat(pending))
            else:
                later.append(pending)
        if later:
            self._requeue(later)
        if not joining:
            return None
        alone = packing.PackedPlan(0, plan.column, plan.column, None, [])
        ids, positions = self._pack(alone, joining)
        hidden = self._lean.prefill_layers(
            ids, positions, packing.packed_cache(self._kv.keys, self._kv.values, alone), alone,
            done)
        base = plan.arrival_tokens
        plan.arrivals += [dataclasses.replace(a, offset=base + a.offset) for a in alone.arrivals]
        seated += joining
        self.stats.joined_midstep += len(joining)
        return hidden, positions

    def _has_free_slot(self) -> bool:
        """A slot for one more row without growing the cache."""
        return None in self._rows or len(self._rows) < self._kv.slots

    def _joined(self, seated, tokens: torch.Tensor) -> None:
        """Packed arrivals continue from their first token; full prompts teach the prefix
        cache."""
        for (slot, row, sequence, hit), token in zip(seated, tokens, strict=True):
            self._positions[slot] = len(sequence)
            self._last[slot] = token
            if self._prefixes is not None and not hit:
                self._remember_prefix([sequence], [
                    (keys[slot:slot + 1], values[slot:slot + 1])
                    for keys, values in zip(self._kv.keys, self._kv.values, strict=True)],
                    row.start)
        self.stats.packed_arrivals += len(seated)

    def _settle_launched(self) -> None:
        if self._launched is not None:
            launched, self._launched = self._launched, None
            self._settle(launched)

    def _set_running(self, rows: list[_Row | None]) -> None:
        """The requests load(), a failed step and the chunks' batch_size count: these rows
        (the ones finishing now included) and the rows prefilled mid-step, which join the
        batch when the step ends."""
        joining = self._prefilled_midstep.rows if self._prefilled_midstep else []
        self._running = [r.pending for r in (*rows, *joining) if r is not None]

    def _emit(self, rows: list[_Row], tokens: list[int]) -> list[int]:
        """Send each row's token; returns the indexes of rows that go on."""
        now = time.perf_counter()
        keep = []
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
        """A row left: its slot stays in the batch, attending to nothing that matters, until a
        new request takes it."""
        self._rows[slot] = None

    def _compact(self) -> None:
        """Keep the batch dense when nobody waits for a free slot: the last live rows move into
        the holes (a copy of those rows only), and idle slots at the end are dropped."""
        with self._wake:
            waiting = len(self._waiting)
        if not waiting and None in self._rows and self._compaction_pays():
            holes = [i for i, r in enumerate(self._rows) if r is None]
            tail = [i for i in reversed(range(len(self._rows))) if self._rows[i] is not None]
            moves = [(src, dst) for dst, src in zip(holes, tail, strict=False) if src > dst]
            if moves:
                self._settle_launched()  # its rows are known by slot
                moves = [(s, d) for s, d in moves if self._rows[s] is not None]
            if moves:
                source = torch.tensor([s for s, _ in moves], device=self._device)
                target = torch.tensor([d for _, d in moves], device=self._device)
                self._kv.copy_rows(source, target)
                for tensor in (self._positions, self._last):
                    tensor.index_copy_(0, target, tensor.index_select(0, source))
                for src, dst in moves:
                    self._rows[dst], self._rows[src] = self._rows[src], None
        while self._rows and self._rows[-1] is None:
            self._rows.pop()
        if not self._rows:
            self.reset(keep_cache=True)

    def _compaction_pays(self) -> bool:
        """On CPU every idle slot costs compute; a graph costs the same for any row count
        inside its bucket, so there only a smaller bucket is worth a settle and a copy."""
        if self._graphs is None:
            return True
        live = len(self._live())
        return bucket(live, MIN_ROWS) < bucket(len(self._rows), MIN_ROWS)

    def shutdown(self) -> None:
        super().shutdown()
        for hook in self._layer_hooks:  # the model may outlive this engine (benchmarks)
            hook.remove()
        if self._grouped_query:
            packing.disable(self._model)

    def reset(self, keep_cache: bool = False) -> None:
        """Forget the batch. A GPU keeps its buffers and graphs; a CPU engine's memory goes
        back, unless `keep_cache` (the batch emptied, nothing failed): then its buffers wait
        `engine.kv_cache_keep_s` for the next requests (every slot is written afresh when a
        row takes it, so nothing of the old batch is read)."""
        self._rows, self._running, self._column = [], [], 0
        self._prefilled_midstep = None
        self._launched = None  # only rows that already left can still be in it
        self._emptied_at = time.monotonic()
        if self._graphs is None and not (keep_cache and self.config.kv_cache_keep_s):
            self.release_idle()

    def idle_wait_s(self) -> float | None:
        if self._graphs is not None or self._kv is None or self._rows:
            return None
        return max(0.0, self._emptied_at + self.config.kv_cache_keep_s - time.monotonic())

    def release_idle(self) -> None:  # only ever due on CPU, with the batch empty
        self._kv = self._positions = self._last = None


def _pack_from(setting: int | bool) -> int | None:
    """engine.pack_arrivals as the running rows from which arrivals are packed (None: never)."""
    if setting is True:
        return 1
    return setting or None


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword that takes the KV cache: transformers 5.x renamed past_key_values
    to cache; older models keep the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stack of decoder layers (Llama's `model.layers`, GPT-2's `transformer.h`):
    the first ModuleList as long as the config's layer count (a mixture of experts has longer
    lists inside each layer), else the longest, or none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    count = getattr(model.config, "num_hidden_layers", None)
    layers = next((m for m in lists if len(m) == count), None)
    if layers is None and lists:
        layers = max(lists, key=len)
    return list(layers) if layers is not None else []
