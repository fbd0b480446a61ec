"""Arrivals packed into the decode step: a new prompt rides in the running batch's own pass.

On a CPU one forward pass costs nearly as much for one row as for many (every pass reads all
the weights), so a prompt prefilled in a pass of its own costs the whole batch a step's worth
of time (SmolLM2 on two cores: 52-70 ms, against 88 ms for a 64-row decode step). Packed, the
step's input is one sequence: a token per batch slot, then each arrival's prompt tokens (those
after a cached prefix). Each layer writes the slots' new K/V at the step's column and each
arrival's K/V into its own slot, so that its prompt ends at that column as a prefilled row's
would; attention then runs per group: the batch rows over their columns, as in any decode
step, and each arrival causally over its own span. Its first token comes out of the same
pass.

The model's attention must go through transformers' attention interface: `enable` switches a
model whose implementation is SDPA to `rayinfer_packed`, which is SDPA itself for prompts
(several query tokens) and `decode_attention` for decode steps (one query token per row), and
packs a step that carries a `PackedPlan`. Every decode step runs this way, on any device,
arrivals or not: transformers' SDPA path copies K/V once per query head group whenever a step
has a mask (every decode step here), where decode_attention reads each K/V head once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "rayinfer_packed"
PLAN = "rayinfer_plan"  # the forward pass's keyword that carries a PackedPlan to attention


@dataclass
class Arrival:
    """One new request's prompt in a packed step."""

    slot: int
    offset: int  # its first new token's index in the packed input, after the batch rows
    length: int  # new tokens (its prompt after the cached prefix)
    start: int  # the first column of its span (cached prefix included); it ends at the step's
    mask: torch.Tensor | None  # (1, 1, length, span) bool when it has a prefix, else causal


@dataclass
class PackedPlan:
    rows: int  # batch slots [0, rows) decode one token each
    first: int  # the batch rows' first column
    column: int  # the column this step writes
    mask: torch.Tensor | None  # the batch rows' additive (rows, 1, 1, column + 1 - first) mask
    arrivals: list[Arrival]

    @property
    def arrival_tokens(self) -> int:
        """The packed input's tokens after the batch rows: every arrival's new tokens."""
        return sum(arrival.length for arrival in self.arrivals)

    def keep(self, device: torch.device) -> torch.Tensor:
        """The packed positions whose logits the step needs: every batch row, and each
        arrival's last prompt token."""
        lasts = [self.rows + a.offset + a.length - 1 for a in self.arrivals]
        return torch.cat([torch.arange(self.rows, device=device),
                          torch.tensor(lasts, dtype=torch.long, device=device)])


def arrival_mask(prefix: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Token i of an arrival sees its cached prefix and its own tokens up to i."""
    if not prefix:
        return None
    return torch.ones(length, prefix + length, dtype=torch.bool, device=device).tril(
        diagonal=prefix)[None, None]


def supported(model: torch.nn.Module) -> bool:
    """Models whose attention goes through the interface, running SDPA now."""
    return (bool(getattr(model, "_supports_attention_backend", False))
            and model.config._attn_implementation in ("sdpa", IMPLEMENTATION))


def enable(model: torch.nn.Module) -> None:
    AttentionInterface.register(IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(IMPLEMENTATION)


def disable(model: torch.nn.Module) -> None:
    if model.config._attn_implementation == IMPLEMENTATION:
        model.set_attn_implementation("sdpa")


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor, scale: float | None) -> torch.Tensor:
    """One query token per row: query (rows, heads, 1, dim) over key/value (rows, kv_heads,
    columns, dim) with an additive (rows, 1, 1, columns) mask; returns (rows, 1, heads, dim).
    SDPA's own grouped-query support reads K/V as stored (benchmarks/gpu_step.py: 0.09x the
    time of attention over repeated K/V on an H100, and faster than folding each head group
    into the query length). K/V stored in another dtype (`engine.kv_cache_dtype`) are read in
    it: the query is cast to it and the output back.

    On a CPU with bf16 or fp16 K/V each row's query heads that share a K/V head are instead
    folded into the query length of a plain SDPA call: a third of the (row, head) blocks for
    SmolLM2 (9 query heads, 3 K/V heads), and a 64-row bf16 step of SmolLM2 in 0.94-0.97x the
    time on the 2-core Xeon (16 rows: 0.97x; benchmarks/decode_attention_step.py). fp32 K/V
    (0.98-1.02x) and GPUs (1.37x on an H100) keep enable_gqa."""
    if (query.shape[1] != key.shape[1] and key.device.type == "cpu"
            and key.dtype != torch.float32):
        return folded_decode_attention(query, key, value, mask, scale)
    return grouped_decode_attention(query, key, value, mask, scale)


def grouped_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             mask: torch.Tensor, scale: float | None) -> torch.Tensor:
    """decode_attention through SDPA's grouped-query support (enable_gqa)."""
    out = F.scaled_dot_product_attention(query.to(key.dtype), key, value, attn_mask=mask,
                                         scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).to(query.dtype)


def folded_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: torch.Tensor, scale: float | None) -> torch.Tensor:
    """decode_attention with each K/V head's query heads as a query of that many tokens."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.to(key.dtype).view(rows, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).to(query.dtype)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    plan: PackedPlan | None = kwargs.pop(PLAN, None)
    if plan is None:
        if query.shape[2] == 1 and attention_mask is not None and not module.training:
            return decode_attention(query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    # query: (1, heads, rows + new tokens, dim); key/value: the layer's whole SlotKV buffers.
    query = query[0]
    rows, end = plan.rows, plan.column + 1
    outputs = []
    if rows:  # none where arrivals run a step's first layers alone (lean.py)
        batch = query[:, :rows].transpose(0, 1).unsqueeze(2)
        outputs.append(decode_attention(batch, key[:rows, :, plan.first:end],
                                        value[:rows, :, plan.first:end], plan.mask, scaling)[:, 0])
    for arrival in plan.arrivals:
        start = rows + arrival.offset
        mine = query[:, start:start + arrival.length].unsqueeze(0).to(key.dtype)
        span = slice(arrival.start, end)
        out = F.scaled_dot_product_attention(
            mine, key[arrival.slot:arrival.slot + 1, :, span],
            value[arrival.slot:arrival.slot + 1, :, span], attn_mask=arrival.mask,
            is_causal=arrival.mask is None, scale=scaling, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1).to(query.dtype))
    # (1, tokens, heads, dim), as transformers' own attention functions return it.
    return torch.cat(outputs).unsqueeze(0), None


def packed_cache(keys: list[torch.Tensor], values: list[torch.Tensor], plan: PackedPlan) -> Cache:
    """A transformers Cache over SlotKV buffers that stores a packed step's K/V."""
    return Cache(layers=[_PackedLayer(k, v, plan) for k, v in zip(keys, values, strict=True)])


class _PackedLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, plan: PackedPlan):
        super().__init__()
        self._keys, self._values, self._plan = keys, values, plan
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist already
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        plan = self._plan
        rows, column = plan.rows, plan.column
        for store, new in ((self._keys, key_states[0]), (self._values, value_states[0])):
            store[:rows, :, column] = new[:, :rows].transpose(0, 1)
            # After the batch rows: an arrival may take a free slot among them.
            for arrival in plan.arrivals:
                start = rows + arrival.offset
                store[arrival.slot, :, column + 1 - arrival.length:column + 1] = \
                    new[:, start:start + arrival.length]
        return self._keys, self._values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self._plan.column + 1 - self._plan.first, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self._plan.column - self._plan.first

    def get_max_length(self) -> int:
        return -1
