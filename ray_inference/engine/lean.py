"""Packed decode steps of Llama-shaped models without transformers' per-layer machinery.

A CPU decode step of SmolLM2 runs some 900 small kernels, with Python around them (keyword
plumbing, the attention interface's lookup, output capture, the mask builder); skipping that
Python took a one-row step to 0.83-0.86x its time (benchmarks/lean_step.py). For models built
of transformers' own Llama layers (SmolLM2, Llama 3, TinyLlama) `LeanDecoder` runs a packed
step (packing.py) by calling each layer's modules itself: the same modules (packed, 4-bit or
int8 linear layers included), the same rotary function, the same cache writes and the same
packed attention, so the logits are the model's own, bit for bit; only the calls between them
are fewer. Forward hooks on a decoder layer still run after it (the engine's admission between
layers uses them).
"""

from __future__ import annotations

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


class LeanDecoder:
    def __init__(self, model: LlamaForCausalLM):
        self._model = model
        self._layers = list(model.model.layers)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, plan: packing.PackedPlan,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a packed step: `ids` and `positions` (tokens,) as packed, `cache` the
        step's packing.packed_cache, `keep` the tokens whose logits are wanted (all if None)."""
        inner = self._model.model
        hidden = inner.embed_tokens(ids)[None]  # (1, tokens, hidden), as the model runs it
        cos, sin = inner.rotary_emb(hidden, positions[None])
        for layer, cached in zip(self._layers, cache.layers, strict=True):
            layer_input = hidden
            attention = layer.self_attn
            shape = (1, ids.shape[0], -1, attention.head_dim)
            normed = layer.input_layernorm(hidden)
            query = attention.q_proj(normed).view(shape).transpose(1, 2)
            key = attention.k_proj(normed).view(shape).transpose(1, 2)
            value = attention.v_proj(normed).view(shape).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key, value = cached.update(key, value)
            out, _ = packing.packed_attention(attention, query, key, value, None,
                                              scaling=attention.scaling,
                                              **{packing.PLAN: plan})
            hidden = hidden + attention.o_proj(out.reshape(*shape[:2], -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = _run_forward_hooks(layer, layer_input, hidden)
        hidden = inner.norm(hidden)[0]
        return self._model.lm_head(hidden if keep is None else hidden.index_select(0, keep))


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
