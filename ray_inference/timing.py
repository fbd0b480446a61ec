"""Timing alternatives against each other on a machine other processes share."""

from __future__ import annotations

import time
from collections.abc import Callable


def fastest_seconds(runs: dict[str, Callable[[], object]], rounds: int = 7) -> dict[str, float]:
    """Each run's fastest of `rounds` rounds, the runs taking turns within a round (after one
    call each, which builds their kernels): on a busy machine the minimum is the measurement
    that other processes disturbed least."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best
