"""`engine.huge_pages`: the engine's weights and KV cache on 2 MB pages, checked in this
process's own page tables (/proc/self/smaps_rollup) on this machine's kernel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_inference.config import EngineConfig
from ray_inference.engine import create_engine, huge_pages
from ray_inference.models import loader, registry

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(),
                                reason="this kernel has no transparent huge pages")


# Each check runs in a fresh process: there the process's totals in /proc/self/smaps_rollup
# move only with what the check does (in the test session, memory that earlier tests freed
# could leave huge pages meanwhile).
PRELUDE = """
import json, torch
from ray_inference.engine import huge_pages
from ray_inference.engine.kv import SlotKV

def rollup(field):
    with open("/proc/self/smaps_rollup") as rollup:
        return int(next(l for l in rollup if l.startswith(field)).split()[1]) * 1024
"""


def run_isolated(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_resident_memory_is_collapsed_in_place_without_growing():
    found = run_isolated("""
        weights = torch.randn(48 << 20 >> 2)  # 48 MiB, every page written
        copy = weights.clone()
        huge, rss = rollup("AnonHugePages"), rollup("Rss")
        collapsed = huge_pages.collapse_resident()
        print(json.dumps({"collapsed": collapsed, "huge": rollup("AnonHugePages") - huge,
                          "rss": rollup("Rss") - rss, "same": torch.equal(weights, copy)}))
    """)
    assert found["collapsed"] >= 80 << 20  # both tensors, less their unaligned ends
    assert found["huge"] >= 80 << 20
    assert found["same"]
    assert found["rss"] < 8 << 20  # only whole resident ranges: no page is added


def test_kv_buffers_start_on_huge_pages_and_keep_their_values_when_grown():
    found = run_isolated("""
        before = rollup("AnonHugePages")
        kv = SlotKV(4, 3, 64, torch.float32, torch.device("cpu"), 64, 128, 1024, huge_pages=True)
        plain = SlotKV(4, 3, 64, torch.float32, torch.device("cpu"), 64, 128, 1024)
        found = {"aligned": all(k.data_ptr() % huge_pages.HUGE == 0 for k in kv.keys),
                 "zeroed": all(torch.count_nonzero(b) == 0 for b in kv.keys + kv.values),
                 "nbytes": [kv.nbytes, plain.nbytes], "new": rollup("AnonHugePages") - before}
        for mine, other in zip(kv.keys + kv.values, plain.keys + plain.values, strict=True):
            other.copy_(mine.normal_())
        kv.grow(64, 256)
        plain.grow(64, 256)
        found["grown"] = rollup("AnonHugePages") - before
        found["grown_nbytes"] = kv.nbytes
        found["kept"] = all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values,
                                                               plain.keys + plain.values))
        found["fresh"] = all(torch.count_nonzero(b[:, :, 128:]) == 0 for b in kv.keys)
        print(json.dumps(found))
    """)
    # Each layer's allocation (its K, then its V) starts on a 2 MB boundary, zeroed.
    assert found["aligned"] and found["zeroed"]
    assert found["nbytes"] == [8 * 64 * 3 * 128 * 64 * 4] * 2
    assert found["new"] >= 0.8 * found["nbytes"][0]
    # 8 buffers of 12 MiB, a new 24 MiB allocation per layer: nearly all on huge pages.
    assert found["grown"] >= 0.8 * found["grown_nbytes"]
    assert found["kept"] and found["fresh"]


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
