"""The benchmark runs every variant on the real model and reports comparable numbers."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.model


def test_offline_bench_compares_variants_side_by_side(tmp_path):
    from ray_inference.bench.offline import run

    lines = []
    out = tmp_path / "bench.json"
    rows = run([2], min_tokens=3, max_tokens=5, sequential=1, seed=1, out=out, echo=lines.append)
    assert [r.variant[0] for r in rows] == ["a", "b", "c"]
    assert all(r.tokens > 0 and r.tok_s > 0 for r in rows)
    assert rows[1].tokens == rows[2].tokens  # the same work through (b) and (c)
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 3
    assert out.with_suffix(".png").stat().st_size > 1000
    assert any("x (a)" in line for line in lines)
