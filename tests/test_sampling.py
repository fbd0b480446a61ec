"""The sampler on its own: drawn frequencies, nuclei, greedy rows and seeds (no model)."""

from __future__ import annotations

import collections

import pytest
import torch

from ray_inference.engine import sampling
from ray_inference.engine.sampling import SamplingParams, sample


def _draws(logits: torch.Tensor, params: list[SamplingParams], steps: int) -> list[list[int]]:
    """Each row's tokens over `steps` calls (the same logits every call)."""
    picks = [sample(logits, params).tolist() for _ in range(steps)]
    return [[step[row] for step in picks] for row in range(len(params))]


def test_drawn_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    expected = torch.softmax(logits / 0.5, dim=-1)
    params = [SamplingParams.create(0.5, 1.0, seed) for seed in range(64)]
    draws = [t for row in _draws(logits.repeat(64, 1), params, 200) for t in row]
    counts = collections.Counter(draws)
    for token, p in enumerate(expected.tolist()):
        # 12,800 draws: the standard error is at most 0.0045.
        assert abs(counts[token] / len(draws) - p) < 0.02, (token, counts)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # The mass before the third token is 0.8, past 0.7: only the first two stay.
    params = [SamplingParams.create(1.0, 0.7, seed) for seed in range(32)]
    draws = [t for row in _draws(logits.repeat(32, 1), params, 200) for t in row]
    counts = collections.Counter(draws)
    assert set(counts) == {0, 1}
    assert abs(counts[0] / len(draws) - 0.5 / 0.8) < 0.02


def _nucleus_size(logits: torch.Tensor, top_p: float) -> int:
    probs = torch.softmax(logits, dim=-1).sort(descending=True).values
    return int(((probs.cumsum(0) - probs) < top_p).sum())


@pytest.mark.parametrize("windows", [sampling.NUCLEUS_WINDOWS, ()], ids=["cpu", "sorted"])
def test_each_row_is_drawn_from_the_window_that_holds_its_nucleus(monkeypatch, windows):
    """Rows whose nuclei fit each window, and none (every row sorted, as on a GPU)."""
    small, large = sampling.NUCLEUS_WINDOWS
    monkeypatch.setattr(sampling, "NUCLEUS_WINDOWS", windows)
    vocab = 3 * large
    flat = -torch.linspace(0, 1, vocab)  # a nucleus past both windows: the sorted vocabulary
    middle = torch.full((vocab,), -30.0)
    middle[:4 * small] = -torch.linspace(0, 1, 4 * small)  # a nucleus in the larger window
    peaked = flat.clone()
    peaked[7] = 30.0  # a nucleus of one token, in the small window
    nuclei = [_nucleus_size(row, 0.9) for row in (flat, middle, peaked)]
    assert nuclei[0] > large and small < nuclei[1] < large and nuclei[2] == 1
    params = [SamplingParams.create(1.0, 0.9, seed) for seed in range(15)]
    rows = _draws(torch.stack([flat, middle, peaked] * 5), params, 100)
    for kind, (nucleus, past) in enumerate([(nuclei[0], large), (nuclei[1], small)]):
        drawn = {t for row in rows[kind::3] for t in row}
        assert max(drawn) < nucleus  # the logits fall with the index: the nucleus comes first
        assert max(drawn) >= past  # drawn from past the smaller window
    assert {t for row in rows[2::3] for t in row} == {7}


def test_the_ends_of_the_uniform_pick_tokens_with_weight():
    weights = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0]] * 3)
    picks = sampling._draw(weights, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert picks.tolist() == [1, 2, 2]  # 1.0 (never drawn) still lands on a token with weight


def test_greedy_rows_and_seeded_rows_keep_to_themselves():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    alone = _draws(logits[2:3], [SamplingParams.create(1.2, 0.95, 11)], 50)[0]
    mixed = [SamplingParams.create(0.0, 1.0, None), SamplingParams.create(1.0, 1.0, None),
             SamplingParams.create(1.2, 0.95, 11), SamplingParams.create(0.7, 0.5, 3),
             SamplingParams.create(0.0, 1.0, 4)]
    rows = _draws(logits, mixed, 50)
    assert rows[2] == alone  # its seed's draws, whoever shares the batch
    argmax = logits.argmax(dim=-1).tolist()
    assert set(rows[0]) == {argmax[0]}
    assert set(rows[4]) == {argmax[4]}
    assert len(set(rows[1])) > 10  # sampled, not greedy


def test_rows_without_top_p_draw_from_the_whole_distribution_beside_a_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = [SamplingParams.create(1.0, 0.7, seed) if seed % 2 else
              SamplingParams.create(1.0, 1.0, seed) for seed in range(32)]
    rows = _draws(logits.repeat(32, 1), params, 100)
    whole = collections.Counter(t for row in rows[0::2] for t in row)
    assert set(whole) == {0, 1, 2, 3}
    assert abs(whole[3] / sum(whole.values()) - 0.05) < 0.02
    assert {t for row in rows[1::2] for t in row} == {0, 1}


def test_nan_logits_still_give_tokens_of_the_vocabulary():
    logits = torch.full((2, 5), float("nan"))
    params = [SamplingParams.create(1.0, 1.0, None), SamplingParams.create(1.0, 0.9, None)]
    assert all(0 <= t < 5 for t in sample(logits, params).tolist())
