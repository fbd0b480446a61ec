"""`engine.huge_pages`: the engine's weights and KV cache on 2 MB pages, checked in this
process's own page tables (/proc/self/smaps_rollup) on this machine's kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_inference.config import EngineConfig
from ray_inference.engine import create_engine, huge_pages
from ray_inference.engine.kv import SlotKV
from ray_inference.models import loader, registry

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(),
                                reason="this kernel has no transparent huge pages")


def huge_bytes() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        line = next(line for line in rollup if line.startswith("AnonHugePages"))
    return int(line.split()[1]) * 1024


def rss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        return int(next(line for line in rollup if line.startswith("Rss")).split()[1]) * 1024


def test_resident_memory_is_collapsed_in_place_without_growing():
    weights = torch.randn(48 << 20 >> 2)  # 48 MiB, every page written
    copy = weights.clone()
    before, rss = huge_bytes(), rss_bytes()
    collapsed = huge_pages.collapse_resident()
    assert collapsed >= 80 << 20  # both tensors, less their unaligned ends
    assert huge_bytes() - before >= 80 << 20
    assert torch.equal(weights, copy)
    # Only whole resident ranges are collapsed: no page is added.
    assert rss_bytes() - rss < 8 << 20


def test_kv_buffers_start_on_huge_pages_and_keep_their_values_when_grown():
    before = huge_bytes()
    kv = SlotKV(4, 3, 64, torch.float32, torch.device("cpu"), 64, 128, 1024, huge_pages=True)
    assert huge_bytes() - before >= 0.8 * kv.nbytes
    plain = SlotKV(4, 3, 64, torch.float32, torch.device("cpu"), 64, 128, 1024)
    # Each layer's allocation (its K, then its V) starts on a 2 MB boundary.
    assert all(key.data_ptr() % huge_pages.HUGE == 0 for key in kv.keys)
    assert all(torch.count_nonzero(b) == 0 for b in kv.keys + kv.values)
    assert kv.nbytes == plain.nbytes == 8 * 64 * 3 * 128 * 64 * 4
    for mine, other in zip(kv.keys + kv.values, plain.keys + plain.values, strict=True):
        other.copy_(mine.normal_())
    kv.grow(64, 256)
    plain.grow(64, 256)
    # 8 buffers of 12 MiB, a new 24 MiB allocation per layer: nearly all of it on huge pages.
    assert huge_bytes() - before >= 0.8 * kv.nbytes
    for mine, other in zip(kv.keys + kv.values, plain.keys + plain.values, strict=True):
        assert torch.equal(mine, other)
        assert torch.count_nonzero(mine[:, :, 128:]) == 0


def test_a_cpu_engine_reports_what_it_collapsed(tiny_llama):
    loaded = loader.load(registry.resolve(tiny_llama), "float32")
    copy = loaded.own_copy()  # before an engine packs the first one's weights
    on = create_engine(loaded, EngineConfig(max_batch_size=4))
    off = create_engine(copy, EngineConfig(max_batch_size=4, huge_pages=False))
    try:
        assert on.describe()["huge_page_bytes"] > 0
        assert on.describe()["huge_page_bytes"] % huge_pages.HUGE == 0
        assert off.describe()["huge_page_bytes"] == 0
    finally:
        on.shutdown()
        off.shutdown()
