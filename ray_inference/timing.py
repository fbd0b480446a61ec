"""Timing alternatives against each other on a machine other processes share."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


def seconds_per_round(runs: dict[str, Callable[[], object]], rounds: int,
                      calls: int = 1) -> dict[str, list[float]]:
    """Each run's seconds a call in each of `rounds` rounds of `calls` calls, the runs taking
    turns within a round and their order flipping every round (none always goes first, into a
    warmer or a colder cache)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in sorted(runs, reverse=round_ % 2 == 1):
            started = time.perf_counter()
            for _ in range(calls):
                runs[name]()
            times[name].append((time.perf_counter() - started) / calls)
    return times


def fastest_seconds(runs: dict[str, Callable[[], object]], rounds: int = 7) -> dict[str, float]:
    """Each run's fastest of `rounds` rounds (after one call each, which builds their kernels):
    on a busy machine the minimum is the measurement that other processes disturbed least."""
    for run in runs.values():
        run()
    return {name: min(times) for name, times in seconds_per_round(runs, rounds).items()}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block: kernels ranked per core. With two threads, while
    another process took the cores (a second worker starting beside this one), OpenMP's
    barriers stalled at random: the bf16/fp32 ratio swung from 0.4 to 2.8 on the 2-core Xeon
    without AMX, and int8 against fp32 from 0.6 to 6.3 on the Xeon with AMX; on one thread they
    stayed 1.46-3.0 and 0.39-0.81."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
