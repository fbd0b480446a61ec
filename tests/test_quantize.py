"""Linear layers in int8 (`engine.quantize: int8`, ray_inference/engine/quantize.py) on real
CPU int8 products."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch

from ray_inference.config import ConfigError, EngineConfig, from_dict
from ray_inference.engine import GenerationRequest, create_engine, quantize
from ray_inference.engine.base import short_dtype
from ray_inference.models import loader, registry


def rounded_product(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What the scheme computes, in float64: the weight rounded per output channel, the input
    per row, both to -127..127."""
    w, rows = layer.weight.double(), x.double().reshape(-1, layer.in_features)
    w_scale = w.abs().amax(dim=1, keepdim=True) / 127
    x_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-300) / 127
    out = torch.round(rows / x_scale) * x_scale @ (torch.round(w / w_scale) * w_scale).t()
    if layer.bias is not None:
        out += layer.bias.double()
    return out.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("bias", [True, False])
def test_an_int8_layer_computes_the_rounded_product_close_to_the_plain_one(bias):
    """Rows of very different sizes each keep their own scale; one row, a batch, a 3-d input
    and none; the wrong width fails as with the plain layer."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(72, 40, bias=bias)
    layer = quantize.Int8Linear(plain)
    assert layer.weight_int8.dtype == torch.int8
    with torch.inference_mode():
        for shape in ((1, 72), (5, 72), (2, 7, 72), (0, 72)):
            x = torch.randn(shape)
            x[..., :1, :] *= 1000  # a row a thousand times larger than the rest
            out = layer(x)
            assert out.shape == (*shape[:-1], 40) and out.dtype == torch.float32
            torch.testing.assert_close(out.double(), rounded_product(plain, x),
                                       rtol=1e-5, atol=1e-5)
            error = (out - plain(x)).norm(dim=-1) / plain(x).norm(dim=-1)
            assert (error < 0.02).all()  # each row, the large one and the small ones alike
        with pytest.raises(RuntimeError, match="72 inputs got 73"):
            layer(torch.randn(3, 73))


def test_a_rows_output_does_not_depend_on_the_rows_beside_it():
    """Each row has its own scale and int32 sums are exact: a row gives the same output, bit
    for bit, alone or beside a row a thousand times larger (one scale per tensor would not)."""
    torch.manual_seed(0)
    layer = quantize.Int8Linear(torch.nn.Linear(72, 40))
    small, large = torch.randn(1, 72), torch.randn(1, 72) * 1000
    with torch.inference_mode():
        assert torch.equal(layer(torch.cat([small, large]))[:1], layer(small))


def test_a_bf16_input_gives_a_bf16_output():
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 32).to(torch.bfloat16)
    layer = quantize.Int8Linear(plain)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), rounded_product(plain, x), rtol=0.02,
                                   atol=0.02)


def test_every_linear_layer_but_the_output_layer_turns_int8(model_dir):
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), "float32")
    model = loaded.model
    twin = copy.deepcopy(model)
    ids = loaded.tokenizer("the cat is a dog of no", return_tensors="pt")["input_ids"]
    # Without the speed check: the layers are tested on CPUs where int8 is slow too.
    assert quantize.quantize(model, if_fast=False) == 14  # 2 layers x 7 projections
    assert [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)] == ["lm_head"]
    assert quantize.quantize(model, if_fast=False) == 0  # nothing left to quantize
    with torch.inference_mode():
        logits, plain = model(ids).logits, twin(ids).logits
    assert not torch.equal(logits, plain)  # it did change the arithmetic
    similarity = torch.nn.functional.cosine_similarity(logits, plain, dim=-1)
    assert (similarity > 0.99).all()


def test_an_int8_engine_gives_each_request_the_answer_it_gets_alone(model_dir):
    """End to end through the engine: a request's tokens do not depend on what else shares the
    batch. (The layer tests above tell one scale per row from one per tensor; on this tiny
    model a per-tensor scale gave different tokens in one try and the same in another.)"""
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), "float32")
    if not quantize.fast(loaded.model.config.hidden_size):  # measured here, not at collection
        pytest.skip("int8 products are not faster than fp32's on this CPU: its engines "
                    "decline int8 (the test below)")
    engine = create_engine(loaded, EngineConfig(quantize="int8"))
    engine._eos = set()
    prompts = ("hello world", "red", "the cat is a dog of no", "blue green red")
    try:
        assert engine.describe()["int8_linears"] == 14 and engine.numerics() == "fp32 int8"
        alone = [[t for c in engine.submit(GenerationRequest(prompt=p, temperature=0,
                                                             max_tokens=12))
                  for t in c.token_ids] for p in prompts]
        streams = [engine.submit(GenerationRequest(prompt=p, temperature=0, max_tokens=12))
                   for p in prompts]
        together = [[t for c in s for t in c.token_ids] for s in streams]
        assert engine.stats.max_batch > 1
    finally:
        engine.shutdown()
    assert together == alone and all(len(a) == 12 for a in alone)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_is_taken_only_where_it_measured_faster_than_the_models_own_products(
        model_dir, caplog, dtype):
    """The engine's speed check on this CPU, measured afresh: int8 layers where they took less
    time than plain products in the model's dtype, else the model as it was and a warning that
    gives both times (the AMD EPYC without VNNI declines fp32: about 15x; a Xeon with AMX
    declines bf16, whose products are faster than int8's there, and keeps fp32). Either way
    the engine answers."""
    quantize._measured_fast.cache_clear()  # measured once per process: measure here
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), dtype)
    short = short_dtype(loaded.dtype)
    with caplog.at_level(logging.INFO, logger=quantize.__name__):
        engine = create_engine(loaded, EngineConfig(quantize="int8"))
    try:
        int8_ms, own_ms = map(float, re.search(rf"took ([\d.]+) ms, {short}'s ([\d.]+) ms",
                                               caplog.text).groups())
        int8_layers = [m for m in loaded.model.modules() if isinstance(m, quantize.Int8Linear)]
        if int8_ms < own_ms:
            assert engine.describe()["int8_linears"] == len(int8_layers) == 14
            assert engine.numerics() == f"{short} int8" and "declined" not in caplog.text
        else:
            assert engine.describe()["int8_linears"] == len(int8_layers) == 0
            assert engine.numerics() == short
            warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
            said = re.search(rf"int8 declined: .* took [\d.]+x {short}'s time \(([\d.]+) "
                             r"against ([\d.]+) ms", warning.getMessage())
            assert tuple(map(float, said.groups())) == (int8_ms, own_ms)
        tokens = [t for c in engine.submit(GenerationRequest(prompt="hello", temperature=0,
                                                             max_tokens=5, ignore_eos=True))
                  for t in c.token_ids]
        assert len(tokens) == 5
    finally:
        engine.shutdown()


def test_the_default_keeps_the_models_weights(model_dir):
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), "float32")
    engine = create_engine(loaded, EngineConfig())
    try:
        assert engine.describe()["int8_linears"] == 0
        assert not any(isinstance(m, quantize.Int8Linear) for m in loaded.model.modules())
    finally:
        engine.shutdown()


def test_an_unknown_scheme_is_refused_by_name():
    with pytest.raises(ConfigError, match="quantize"):
        from_dict({"engine": {"quantize": "int4"}})
