"""Packed decode steps of Llama-shaped models without transformers' per-layer machinery.

A CPU decode step of SmolLM2 runs some 900 small kernels, with Python around them (keyword
plumbing, the attention interface's lookup, output capture, the mask builder); skipping that
Python took a one-row step to 0.83-0.86x its time (benchmarks/lean_step.py). For models built
of transformers' own Llama layers (SmolLM2, Llama 3, TinyLlama) `LeanDecoder` runs a packed
step (packing.py) by calling each layer's modules itself: the same modules (packed, 4-bit or
int8 linear layers included), the same rotary function, the same cache writes and the same
packed attention, so the logits are the model's own, bit for bit; only the calls between them
are fewer. Forward hooks on a decoder layer still run after it (the engine's admission between
layers uses them). Between layers a step can also take in arrivals (`join`): their prompts run
the layers done so far alone (`prefill_layers`), then ride the step's remaining layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    apply_rotary_pos_emb,
)

from ray_inference.engine import packing


def supported(model: torch.nn.Module) -> bool:
    """Llama models whose every layer is transformers' own Llama layer, attending to the whole
    span (no sliding window). The engine takes it for packed steps only."""
    if type(model) is not LlamaForCausalLM or getattr(model.config, "sliding_window", None):
        return False
    return all(type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
               for layer in model.model.layers)


# join(done) -> (hidden states, positions) of arrivals joining after `done` layers, or None.
Joiner = Callable[[int], "tuple[torch.Tensor, torch.Tensor] | None"]


class LeanDecoder:
    def __init__(self, model: LlamaForCausalLM):
        self._model = model
        self._layers = list(model.model.layers)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, plan: packing.PackedPlan,
                join: Joiner | None = None) -> torch.Tensor:
        """Logits of a packed step: `ids` and `positions` (tokens,) as packed, `cache` the
        step's packing.packed_cache; every batch row's, then each arrival's last token's.
        `join(done)`, called between layers, may add arrivals to `plan` while the step runs:
        it returns their tokens' hidden states after the first `done` layers (run through
        `prefill_layers`) and their positions, and they ride the step's remaining layers."""
        inner = self._model.model
        hidden = inner.embed_tokens(ids)[None]  # (1, tokens, hidden), as the model runs it
        rotary = inner.rotary_emb(hidden, positions[None])
        for done, (layer, cached) in enumerate(zip(self._layers, cache.layers, strict=True)):
            joined = join(done) if join is not None and done else None
            if joined is not None:
                more, more_positions = joined
                more_rotary = inner.rotary_emb(more, more_positions[None])
                hidden = torch.cat([hidden, more], dim=1)
                rotary = tuple(torch.cat(pair, dim=1) for pair in zip(rotary, more_rotary,
                                                                        strict=True))
            hidden = _run_forward_hooks(layer, hidden, _layer(layer, cached, hidden, rotary, plan))
        hidden = inner.norm(hidden)[0]
        keep = plan.keep(ids.device) if plan.arrivals else None
        return self._model.lm_head(hidden if keep is None else hidden.index_select(0, keep))

    def prefill_layers(self, ids: torch.Tensor, positions: torch.Tensor, cache,
                       plan: packing.PackedPlan, count: int) -> torch.Tensor:
        """Arrivals' prompts (a `plan` of no batch rows) through the first `count` layers
        alone, their K/V written as a packed step writes them: the hidden states (1, tokens,
        hidden) with which they join a step in progress at layer `count`."""
        inner = self._model.model
        hidden = inner.embed_tokens(ids)[None]
        rotary = inner.rotary_emb(hidden, positions[None])
        for layer, cached in zip(self._layers[:count], cache.layers, strict=False):
            hidden = _layer(layer, cached, hidden, rotary, plan)
        return hidden


def _layer(layer: LlamaDecoderLayer, cached, hidden: torch.Tensor, rotary, plan) -> torch.Tensor:
    """One decoder layer of a packed step, its modules called as LlamaDecoderLayer calls them."""
    attention = layer.self_attn
    shape = (1, hidden.shape[1], -1, attention.head_dim)
    normed = layer.input_layernorm(hidden)
    query = attention.q_proj(normed).view(shape).transpose(1, 2)
    key = attention.k_proj(normed).view(shape).transpose(1, 2)
    value = attention.v_proj(normed).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *rotary)
    key, value = cached.update(key, value)
    out, _ = packing.packed_attention(attention, query, key, value, None,
                                      scaling=attention.scaling, **{packing.PLAN: plan})
    hidden = hidden + attention.o_proj(out.reshape(*shape[:2], -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _run_forward_hooks(layer: torch.nn.Module, layer_input: torch.Tensor,
                       output: torch.Tensor) -> torch.Tensor:
    """What `layer(layer_input)` would have called on its way out: its forward hooks (those
    registered `with_kwargs` get no keywords: the lean step passes none). A hook that returns
    a tensor replaces the output, as in `nn.Module.__call__`."""
    for hook_id, hook in layer._forward_hooks.items():
        if layer._forward_hooks_with_kwargs.get(hook_id):
            result = hook(layer, (layer_input,), {}, output)
        else:
            result = hook(layer, (layer_input,), output)
        if result is not None:
            output = result
    return output
