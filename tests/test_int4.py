"""4-bit copies of linear weights for products of few rows (`engine.int4_max_rows`,
ray_inference/engine/int4.py) on torch's real CPU int4 kernel."""

from __future__ import annotations

import logging

import pytest
import torch

from ray_inference.config import ConfigError, EngineConfig, from_dict
from ray_inference.engine import GenerationRequest, create_engine, int4, linears, quantize
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


def tiny(model_dir, four_bit: bool, dtype: str = "float32"):
    loaded = loader.load(registry.resolve(f"tiny-llama={model_dir / 'tiny-llama'}"), dtype)
    if four_bit:
        round_to_four_bits(loaded.model)
    return loaded


def products_of(model: torch.nn.Module) -> set[int]:
    """The distinct 4-bit products that the model's copies take their columns from."""
    return {id(m.product) for m in model.modules() if isinstance(m, int4.FewRowsInt4Linear)}


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
    layer = int4.FewRowsInt4Linear.alone(plain, 4)
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
    layer = int4.FewRowsInt4Linear.alone(plain, 8)
    x = torch.randn(8, 64)
    x[1:] *= 1000
    with torch.inference_mode():
        alone = layer(x[:1])
        assert all(torch.equal(layer(x[:rows])[:1], alone) for rows in (2, 3, 5, 8))


def test_layers_that_read_one_input_share_one_product_and_get_their_own_numbers():
    """q/k/v-like siblings: one call of the kernel for all three, each layer's columns the
    same bit for bit as a copy of its own would give, whichever member is called first."""
    torch.manual_seed(0)
    layers = [four_bit_linear(64, 32), four_bit_linear(64, 16, bias=False),
              four_bit_linear(64, 48)]
    product = int4.FourBitProduct(int4.FourBit.stacked(
        [int4.FourBit.of(layer.weight) for layer in layers]), layers)
    shared = [int4.FewRowsInt4Linear(layer, 4, product, member)
              for member, layer in enumerate(layers)]
    alone = [int4.FewRowsInt4Linear.alone(layer, 4) for layer in layers]
    multiplied = []
    real_multiply = product._multiply
    product._multiply = lambda x: multiplied.append(x) or real_multiply(x)
    with torch.inference_mode():
        for order in ((0, 1, 2), (2, 0, 1)):
            x = torch.randn(1, 3, 64)
            for member in order:
                assert torch.equal(shared[member](x), alone[member](x))
        assert len(multiplied) == 2  # one product per input, not one per layer
        # A member called again with the same tensor (its columns taken) gets a fresh product,
        # as does a call with another tensor of the same values.
        x = torch.randn(2, 64)
        first = shared[0](x)
        assert torch.equal(shared[0](x), first) and torch.equal(shared[1](x.clone()),
                                                                 alone[1](x))
        assert len(multiplied) == 5


def test_the_siblings_are_found_in_a_forward_pass(model_dir, caplog):
    """In a Llama decoder, q/k/v read the attention norm's output and gate/up the MLP norm's;
    o_proj and down_proj each read their own."""
    model = tiny(model_dir, four_bit=True).model
    output = model.get_output_embeddings()
    places = linears.cpu_linears(model, lambda linear: linear is not output)
    groups = int4.readers_of_one_input(model, places)
    names = sorted(tuple(name for _, name in group) for group in groups)
    layers = len(model.model.layers)
    assert names == sorted([("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                            ("o_proj",), ("down_proj",)] * layers)
    # A model that the pass of one token fails on (it takes no input_ids): a copy per layer,
    # with a warning, and the copies work.
    torch.manual_seed(0)
    other = torch.nn.Sequential(four_bit_linear(64, 32), four_bit_linear(32, 16))
    assert int4.readers_of_one_input(other, linears.cpu_linears(other)) == [
        [(other, "0")], [(other, "1")]]
    x = torch.randn(2, 64)
    with torch.inference_mode():
        expected = other(x)
    with caplog.at_level(logging.WARNING, logger="ray_inference.engine.int4"):
        assert int4.add_copies(other, 4, only_exact=True) == 2
    assert "a forward pass of one token failed" in caplog.text
    assert len(products_of(other)) == 2
    with torch.inference_mode():
        torch.testing.assert_close(other(x), expected, rtol=0.02, atol=0.02)


def test_shared_copies_give_the_logits_of_a_copy_per_layer(model_dir):
    """The whole model, passes of 1, 3, 5 and 15 rows: add_copies' shared products against
    a copy per layer, bit for bit."""
    shared = tiny(model_dir, four_bit=True).model
    assert int4.add_copies(shared, 16, only_exact=True) == 14
    assert len(products_of(shared)) == 8  # 2 layers x (q/k/v, o, gate/up, down)
    own = tiny(model_dir, four_bit=True).model
    output = own.get_output_embeddings()
    for parent, name in linears.cpu_linears(own, lambda linear: linear is not output):
        setattr(parent, name, int4.FewRowsInt4Linear.alone(getattr(parent, name), 16))
    ids = torch.tensor([[5, 7, 3, 9, 2], [1, 4, 4, 6, 8], [9, 9, 2, 3, 5]])
    with torch.inference_mode():
        for rows in (1, 3):
            logits = [model(input_ids=ids[:rows, -1:]).logits for model in (shared, own)]
            assert torch.equal(*logits)
            last = [model(input_ids=ids[:rows]).logits[:, -1] for model in (shared, own)]
            assert torch.equal(*last)


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
        assert described["int4_max_rows"] == int4.AUTO_MAX_ROWS[torch.float32] == 16
        assert engine.numerics() == "fp32 int4<=16"
        assert not isinstance(loaded.model.get_output_embeddings(), int4.FewRowsInt4Linear)
        # The engine's forward pass found the siblings: q/k/v and gate/up share a product.
        assert len(products_of(loaded.model)) == 8
        # Each copy's layer for many rows was packed for MKL as before.
        assert described["prepacked_linears"] == 15
        engine._eos = set()
        alone = answers(engine, together=False)
        together = answers(engine, together=True)
        assert engine.stats.max_batch > 1
    finally:
        engine.shutdown()
    assert together == alone and all(len(a) == 12 for a in alone)


def test_auto_copies_a_bf16_models_layers_for_fewer_rows_than_fp32s(model_dir):
    """bf16's products (AMX) are faster than fp32's, so the copies take fewer rows there."""
    loaded = tiny(model_dir, four_bit=True, dtype="bfloat16")  # on their levels in bf16 too
    engine = create_engine(loaded, EngineConfig())
    try:
        described = engine.describe()
        assert described["int4_linears"] == 14
        assert described["int4_max_rows"] == int4.AUTO_MAX_ROWS[torch.bfloat16] == 8
        assert engine.numerics() == "bf16 int4<=8"
        engine._eos = set()
        together = answers(engine, together=True)
        assert engine.stats.max_batch > 1 and [len(a) for a in together] == [12] * 4
    finally:
        engine.shutdown()


def test_a_number_copies_every_layer_and_says_it_rounded_weights(model_dir, caplog):
    loaded = tiny(model_dir, four_bit=False)
    with caplog.at_level(logging.WARNING, logger="ray_inference.engine.int4"):
        engine = create_engine(loaded, EngineConfig(int4_max_rows=2, quantize="int8"))
    try:
        assert engine.describe()["int4_linears"] == 14
        # The copies' layers for many rows, where this CPU multiplies int8 fast (quantize.py).
        int8 = quantize.fast(loaded.model.config.hidden_size)  # what the engine asked
        assert engine.describe()["int8_linears"] == (14 if int8 else 0)
        assert engine.numerics() == ("fp32 int8 int4<=2" if int8 else "fp32 int4<=2")
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
    assert len(products_of(loaded.model)) == 120  # 30 x (q/k/v, o, gate/up, down)
    assert texts["auto"] == texts[0]
    assert texts["auto"].startswith("The capital of France is Paris")
