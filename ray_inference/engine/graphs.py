"""Decode steps replayed as CUDA graphs.

A decode step of a small model on a GPU is mostly kernel launches (hundreds per step, each a few
microseconds of work). Capturing the step once per (rows, columns) bucket and replaying it costs
one launch. Inputs are copied into the graph's own tensors; the KV cache is written in place at
a column held in a device tensor, so one graph serves every step of its bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ray_inference.engine.kv import SlotKV

log = logging.getLogger(__name__)
MIN_ROWS = 8
MIN_COLUMNS = 64


def bucket(value: int, smallest: int) -> int:
    """The power of two (at least `smallest`) that holds `value`."""
    size = smallest
    while size < value:
        size *= 2
    return size


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: the step runs eagerly (DecodeGraphs(capture=False))
    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    write_at: torch.Tensor
    logits: torch.Tensor | None = None
    run: Callable[[], torch.Tensor] | None = None


class DecodeGraphs:
    """One captured decode step per (rows, columns) bucket, dropped when the cache regrows."""

    def __init__(self, forward: Callable, dtype: torch.dtype, capture: bool = True):
        self._forward = forward
        self._dtype = dtype
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._generation = -1
        # capture=False runs each bucket's step eagerly, with the same buckets, fixed input
        # tensors and captures counted: the graph path without a GPU (the engine tests).
        self._capture = capture
        # One private memory pool for every graph, alive as long as this object.
        self._pool = torch.cuda.MemPool() if capture else None
        self.captures = 0
        self.replays = 0

    def step(self, kv: SlotKV, rows: int, columns: int, ids: torch.Tensor,
             positions: torch.Tensor, column: int) -> torch.Tensor:
        """Logits (rows, vocab) for one decode step over slots [0, rows) and columns
        [0, columns), writing the new K/V at `column`."""
        if kv.generation != self._generation:
            self._graphs.clear()
            self._generation = kv.generation
        captured = self._graphs.get((rows, columns))
        if captured is None:
            captured = self._capture_step(kv, rows, columns, ids, positions, column)
            self._graphs[(rows, columns)] = captured
        else:
            self._load(captured, kv, rows, columns, ids, positions, column)
            if captured.graph is None:
                captured.logits = captured.run()
            else:
                captured.graph.replay()
            self.replays += 1
        return captured.logits

    def _load(self, captured: _Captured, kv, rows, columns, ids, positions, column) -> None:
        captured.ids.copy_(ids[:rows, None])
        captured.positions.copy_(positions[:rows, None])
        captured.write_at.fill_(column)
        kv.attention_mask(rows, 0, columns, self._dtype, out=captured.mask)

    def _capture_step(self, kv, rows, columns, ids, positions, column) -> _Captured:
        device = kv.device
        captured = _Captured(
            torch.cuda.CUDAGraph() if self._capture else None,
            torch.zeros((rows, 1), dtype=torch.long, device=device),
            torch.zeros((rows, 1), dtype=torch.long, device=device),
            torch.zeros((rows, 1, 1, columns), dtype=self._dtype, device=device),
            torch.zeros(1, dtype=torch.long, device=device))
        self._load(captured, kv, rows, columns, ids, positions, column)
        cache = kv.view(rows, 0, columns, captured.write_at)

        def run():
            return self._forward(captured.ids, captured.mask, captured.positions, cache)

        captured.run = run
        if not self._capture:
            captured.logits = run()
            self.captures += 1
            return captured
        # Warm up on a side stream (allocator and library handles), then capture. Both runs
        # write the same K/V at `column` that the real step writes.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        # Only this thread's CUDA calls matter to the capture (the caller's event loop may run).
        with torch.cuda.graph(captured.graph, pool=self._pool.id,
                              capture_error_mode="thread_local"):
            captured.logits = run()
        captured.graph.replay()
        self.captures += 1
        log.info("captured a decode graph for %d rows x %d columns", rows, columns)
        return captured
