"""Lean decode steps (engine/lean.py) against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from ray_inference.engine import lean, packing
from ray_inference.engine.kv import SlotKV
from ray_inference.models import loader, registry


def packed_step(model, rows: int, prompt: int, prefix: int):
    """A packed step's inputs over random K/V: `rows` decode rows (some columns hidden) and
    one arrival of `prompt` new tokens after `prefix` cached ones, in the slot after them."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    dtype = model.dtype
    head_dim = model.model.layers[0].self_attn.head_dim
    kv = SlotKV(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype,
                torch.device("cpu"), rows + 1, 32, 64)
    for tensor in kv.keys + kv.values:
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    first, column = 2, 20
    kv.valid[:rows, first:column + 1] = torch.rand(rows, column + 1 - first,
                                                    generator=generator) > 0.3
    kv.valid[:rows, column] = True
    mask = kv.attention_mask(rows, first, column + 1, dtype)
    start = column + 1 - prefix - prompt
    arrival = packing.Arrival(rows, 0, prompt, start, packing.arrival_mask(prefix, prompt,
                                                                           torch.device("cpu")))
    plan = packing.PackedPlan(rows, first, column, mask, [arrival])
    ids = torch.randint(0, config.vocab_size, (rows + prompt,), generator=generator)
    positions = torch.cat([torch.randint(5, 15, (rows,), generator=generator),
                           torch.arange(prefix, prefix + prompt)])
    return kv, plan, ids, positions


def model_logits(model, kv: SlotKV, plan, ids, positions) -> torch.Tensor:
    """The step as the engine runs it without the lean path: the model's own forward."""
    keep = plan.keep(ids.device)
    out = model(input_ids=ids[None], attention_mask=plan.mask[:1, :, :, :1],
                position_ids=positions[None], use_cache=True, logits_to_keep=keep,
                cache=packing.packed_cache(kv.keys, kv.values, plan), **{packing.PLAN: plan})
    return out.logits[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prefix", [0, 3], ids=["whole-prompt", "after-a-cached-prefix"])
def test_a_lean_step_gives_the_models_own_logits_and_cache(tiny_llama, dtype, prefix):
    loaded = loader.load(registry.resolve(tiny_llama), str(dtype).removeprefix("torch."))
    model = loaded.model
    packing.enable(model)
    assert lean.supported(model)
    kv, plan, ids, positions = packed_step(model, rows=3, prompt=4, prefix=prefix)
    theirs = SlotKV(len(kv.keys), *kv.shape, kv.dtype, kv.device, kv.slots, kv.columns, 64)
    for mine, other in zip(kv.keys + kv.values, theirs.keys + theirs.values, strict=True):
        other.copy_(mine)
    with torch.inference_mode():
        expected = model_logits(model, theirs, plan, ids, positions)
        got = lean.LeanDecoder(model).forward(
            ids, positions, packing.packed_cache(kv.keys, kv.values, plan), plan)
    assert got.shape == (3 + 1, model.config.vocab_size)
    assert torch.equal(got, expected)
    for mine, other in zip(kv.keys + kv.values, theirs.keys + theirs.values, strict=True):
        assert torch.equal(mine, other)  # the step's K/V written to the same columns


@pytest.mark.parametrize("prefix", [0, 3], ids=["whole-prompt", "after-a-cached-prefix"])
def test_an_arrival_that_joins_after_the_first_layer_gets_the_same_logits_and_cache(tiny_llama,
                                                                                  prefix):
    """The step of packed_step, its arrival packed from the start, against the same step whose
    arrival joins after layer 0 (`join`: its prompt runs that layer alone, prefill_layers)."""
    model = loader.load(registry.resolve(tiny_llama), "float32").model
    packing.enable(model)
    kv, plan, ids, positions = packed_step(model, rows=3, prompt=4, prefix=prefix)
    joined = SlotKV(len(kv.keys), *kv.shape, kv.dtype, kv.device, kv.slots, kv.columns, 64)
    for mine, other in zip(kv.keys + kv.values, joined.keys + joined.values, strict=True):
        other.copy_(mine)
    decoder = lean.LeanDecoder(model)
    arrival, rows = plan.arrivals[0], plan.rows
    late = packing.PackedPlan(rows, plan.first, plan.column, plan.mask, [])
    calls = []

    def join(done):
        calls.append(done)
        if done != 1:
            return None
        alone = packing.PackedPlan(0, plan.column, plan.column, None, [arrival])
        hidden = decoder.prefill_layers(
            ids[rows:], positions[rows:],
            packing.packed_cache(joined.keys, joined.values, alone), alone, 1)
        late.arrivals.append(arrival)
        return hidden, positions[rows:]

    with torch.inference_mode():
        expected = decoder.forward(ids, positions, packing.packed_cache(kv.keys, kv.values, plan),
                                   plan)
        got = decoder.forward(ids[:rows], positions[:rows],
                              packing.packed_cache(joined.keys, joined.values, late), late, join)
    assert calls == list(range(1, model.config.num_hidden_layers))
    assert got.shape == expected.shape == (rows + 1, model.config.vocab_size)
    torch.testing.assert_close(got, expected)
    for mine, other in zip(kv.keys + kv.values, joined.keys + joined.values, strict=True):
        torch.testing.assert_close(mine, other)


def test_forward_hooks_on_decoder_layers_still_run(tiny_llama):
    """Both kinds of hook run after their layer, and one that returns a tensor replaces the
    layer's output (zeros here: every logit comes out zero)."""
    model = loader.load(registry.resolve(tiny_llama), "float32").model
    packing.enable(model)
    kv, plan, ids, positions = packed_step(model, rows=2, prompt=1, prefix=0)
    seen = []
    layers = model.model.layers
    handles = [layers[0].register_forward_hook(lambda m, a, out: seen.append(("plain", m))),
               layers[-1].register_forward_hook(lambda m, a, kw, out: seen.append(("kw", m)),
                                                with_kwargs=True)]
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    with torch.inference_mode():
        logits = lean.LeanDecoder(model).forward(
            ids, positions, packing.packed_cache(kv.keys, kv.values, plan), plan)
    for handle in handles:
        handle.remove()
    assert seen == [("plain", layers[0]), ("kw", layers[-1])]
    assert not logits.any()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_other_architectures_keep_the_models_forward(model_dir, name):
    loaded = loader.load(registry.resolve(f"{name}={model_dir / name}"), "float32")
    assert not lean.supported(loaded.model)
