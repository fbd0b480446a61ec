"""4-bit copies of linear weights for products of few rows (`engine.int4_max_rows`,
ray_inference/engine/int4.py) on torch's real CPU int4 kernel."""

from __future__ import annotations

import logging

import pytest
import torch

from ray_inference.config import ConfigError, EngineConfig, from_dict
from ray_inference.engine import GenerationRequest, create_engine, int4
from ray_inference.models import loader, registry

PROMPTS = ("hello world", "red", "the cat is a dog of no", "blue green red")


def four_bit_linear(in_features: int, out_features: int, bias: bool = True) -> torch.nn.Linear:
    """A layer whose weight is 4-bit already, as a dequantized Q4_1 GGUF's are."""
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(int4.FourBit.of(layer.weight).dequantized())
    return layer


def round_to_four_bits(model: torch.nn.Module) -> None:
    """Every linear layer but the output layer made 4-bit, as in a Q4_1 GGUF."""
    output = model.get_output_embeddings()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear) and layer is not output:
                layer.weight.copy_(int4.FourBit.of(layer.weight).dequantized())


def tiny(model_dir, four_bit: bool):
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), "float32")
    if four_bit:
        round_to_four_bits(loaded.model)
    return loaded


def answers(engine, together: bool) -> list[list[int]]:
    """Greedy answers of 12 tokens to PROMPTS, one request at a time or all at once."""
    def ask(prompt):
        return engine.submit(GenerationRequest(prompt=prompt, temperature=0, max_tokens=12))
    if together:
        return [[t for c in s for t in c.token_ids] for s in [ask(p) for p in PROMPTS]]
    return [[t for c in ask(p) for t in c.token_ids] for p in PROMPTS]


def test_rounding_finds_a_4bit_weights_levels_and_tells_other_weights_apart():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    rounded = int4.FourBit.of(weight)
    assert not rounded.exact  # random weights sit between levels
    again = int4.FourBit.of(rounded.dequantized())
    assert again.exact and torch.equal(again.levels, rounded.levels)
    assert int(again.levels.min()) == 0 and int(again.levels.max()) == 15
    torch.testing.assert_close(again.dequantized(), rounded.dequantized(), rtol=1e-6, atol=1e-6)
    # Rounded to bf16 (a model loaded in bf16) the weights still sit on their levels.
    assert int4.FourBit.of(rounded.dequantized().bfloat16()).exact


@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_run_on_the_copy_and_more_rows_on_the_layer_itself(bias):
    torch.manual_seed(0)
    plain = four_bit_linear(64, 32, bias)
    layer = int4.FewRowsInt4Linear(plain, 4, int4.FourBit.of(plain.weight))
    with torch.inference_mode():
        for shape in ((1, 64), (4, 64), (2, 2, 64)):
            x = torch.randn(shape)
            out, expected = layer(x), plain(x)
            assert out.shape == expected.shape and out.dtype == torch.float32
            assert not torch.equal(out, expected)  # the copy ran: bf16 inputs round
            error = (out - expected).norm(dim=-1) / expected.norm(dim=-1)
            assert (error < 0.02).all()
        for shape in ((5, 64), (2, 3, 64), (0, 64)):
            x = torch.randn(shape)
            assert torch.equal(layer(x), plain(x))  # the layer as it is, bit for bit
        with pytest.raises(RuntimeError, match="64 inputs got 65"):
            layer(torch.randn(3, 65))


def test_a_rows_output_does_not_depend_on_the_rows_beside_it():
    """The kernel sums each row on its own: a request's tokens do not depend on its batch."""
    torch.manual_seed(0)
    plain = four_bit_linear(64, 48)
    layer = int4.FewRowsInt4Linear(plain, 8, int4.FourBit.of(plain.weight))
    x = torch.randn(8, 64)
    x[1:] *= 1000
    with torch.inference_mode():
        alone = layer(x[:1])
        assert all(torch.equal(layer(x[:rows])[:1], alone) for rows in (2, 3, 5, 8))


def test_auto_copies_only_4bit_layers_and_never_the_output_layer(model_dir):
    plain = create_engine(tiny(model_dir, four_bit=False), EngineConfig())
    try:
        assert plain.describe()["int4_linears"] == 0 and plain.numerics() == "fp32"
    finally:
        plain.shutdown()
    loaded = tiny(model_dir, four_bit=True)
    engine = create_engine(loaded, EngineConfig())
    try:
        described = engine.describe()
        assert described["int4_linears"] == 14  # 2 layers x 7 projections
        assert described["int4_max_rows"] == int4.AUTO_MAX_ROWS
        assert engine.numerics() == f"fp32 int4<={int4.AUTO_MAX_ROWS}"
        assert not isinstance(loaded.model.get_output_embeddings(), int4.FewRowsInt4Linear)
        # Each copy's layer for many rows was packed for MKL as before.
        assert described["prepacked_linears"] == 15
        engine._eos = set()
        alone = answers(engine, together=False)
        together = answers(engine, together=True)
        assert engine.stats.max_batch > 1
    finally:
        engine.shutdown()
    assert together == alone and all(len(a) == 12 for a in alone)


def test_a_number_copies_every_layer_and_says_it_rounded_weights(model_dir, caplog):
    loaded = tiny(model_dir, four_bit=False)
    with caplog.at_level(logging.WARNING, logger="ray_inference.engine.int4"):
        engine = create_engine(loaded, EngineConfig(int4_max_rows=2, quantize="int8"))
    try:
        assert engine.describe()["int4_linears"] == 14
        assert engine.describe()["int8_linears"] == 14  # the copies' layers for many rows
        assert engine.numerics() == "fp32 int8 int4<=2"
        assert "14 linear layers were not 4-bit" in caplog.text
        engine._eos = set()
        assert [len(a) for a in answers(engine, together=True)] == [12] * 4
    finally:
        engine.shutdown()


def test_zero_makes_no_copies(model_dir):
    loaded = tiny(model_dir, four_bit=True)
    engine = create_engine(loaded, EngineConfig(int4_max_rows=0))
    try:
        assert engine.describe()["int4_linears"] == 0 and engine.numerics() == "fp32"
        assert not any(isinstance(m, int4.FewRowsInt4Linear) for m in loaded.model.modules())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("value", [-1, 5000, "sometimes"])
def test_a_bad_row_count_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=r"engine\.int4_max_rows"):
        from_dict({"engine": {"int4_max_rows": value}})


@pytest.mark.model
def test_the_packaged_smollm2_is_4bit_and_answers_the_same_from_its_copies():
    """SmolLM2 ships as a Q4_1 GGUF: every layer but the output layer gets a copy that holds
    its own weights, and a lone request, whose decode steps run on the copies, gets the
    greedy answer that the fp32 products give."""
    loaded = loader.load(registry.resolve("smollm2"), "float32")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    texts, copies = {}, {}
    for rows, model in ((0, loaded.own_copy()), ("auto", loaded)):
        engine = create_engine(model, EngineConfig(int4_max_rows=rows))
        try:
            copies[rows] = engine.describe()["int4_linears"]
            texts[rows] = "".join(c.text for c in engine.submit(
                GenerationRequest(messages=question, temperature=0, max_tokens=12)))
        finally:
            engine.shutdown()
    assert copies == {0: 0, "auto": 210}  # 30 layers x 7 projections
    assert texts["auto"] == texts[0]
    assert texts["auto"].startswith("The capital of France is Paris")
