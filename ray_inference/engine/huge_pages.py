"""A CPU engine's weights and KV cache on 2 MB pages (`engine.huge_pages`).

A CPU decode step reads every weight and every live K/V column once (SmolLM2 in bf16: 270 MB
of weights in 4 KB pages, tens of thousands of TLB misses a step, each a page walk that a
virtual machine makes longer). The kernel backs memory with transparent huge pages when asked:

- `collapse_resident`, once the engine's weights are in place: `MADV_COLLAPSE` (Linux 6.1 and
  later, whatever the system's THP mode unless it is `never`) copies each 2 MB range of the
  process's private anonymous memory whose pages are all resident into one huge page. Ranges
  with pages missing are left alone, so no memory is added. Weights kept in files (`mmap`ed
  safetensors) are not anonymous and stay as they are.
- `zeros`, for the KV cache's buffers (one allocation per layer holds its K and V): memory
  that starts on a 2 MB boundary, asked for in 2 MB pages before it is first written
  (`MADV_HUGEPAGE`, where the THP mode is `madvise` or `always`) and collapsed after.

The pages that come and go with each step (activations) keep the system's policy. SmolLM2 on
the 2-core Xeon with AMX (both engines in one process, steps alternating): decode steps took
0.84x the time at one row and 0.88x at 64 (benchmarks/huge_pages_step.py), 0.80-0.94x and
0.77-0.96x in by-hand runs, the least gain in the quietest hour. Weights or KV cache alone on
huge pages gave 0.98x each (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

HUGE = 2 << 20  # a transparent huge page on x86-64 and (4 KB base pages) arm64
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PRESENT = 1 << 63  # /proc/self/pagemap: the page is in memory


@functools.cache
def _madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def zeros(numel: int, dtype, device) -> torch.Tensor:
    """A new 1-D tensor of zeros that starts on a 2 MB boundary, its whole ranges on huge
    pages: fresh memory faults in 2 MB at a time (`MADV_HUGEPAGE`), memory that malloc hands
    back from earlier use is copied onto them (`MADV_COLLAPSE`). At most 2 MB more is taken;
    a refusal leaves 4 KB pages, as without it."""
    spare = HUGE // torch.empty((), dtype=dtype).element_size()
    storage = torch.empty(numel + spare, dtype=dtype, device=device)
    offset = (-storage.data_ptr() % HUGE) // storage.element_size()
    tensor = storage[offset:offset + numel]
    start = tensor.data_ptr()
    length = (start + tensor.nbytes) // HUGE * HUGE - start
    try:
        madvise = _madvise() if length > 0 else None
    except (OSError, AttributeError):  # no libc madvise here (not Linux)
        madvise = None
    if madvise:
        madvise(start, length, _MADV_HUGEPAGE)
    tensor.zero_()
    if madvise:
        madvise(start, length, _MADV_COLLAPSE)
    return tensor


def collapse_resident() -> int:
    """Collapse every fully resident, 2 MB-aligned range of this process's private anonymous
    memory into a huge page; returns the bytes now in huge pages this way (0 where the kernel
    or the platform cannot, with one line in the log saying why)."""
    try:
        madvise = _madvise()
        ranges = list(_resident_ranges())
    except (OSError, AttributeError) as exc:
        log.info("huge pages: not available here (%s)", exc)
        return 0
    done = 0
    for start, length in ranges:
        if madvise(start, length, _MADV_COLLAPSE) == 0:
            done += length
            continue
        error = ctypes.get_errno()
        if error == 22 and not done:  # EINVAL: a kernel before 6.1, or THP switched off
            log.info("huge pages: the kernel refused MADV_COLLAPSE (%s)", os.strerror(error))
            return 0
        # EAGAIN/ENOMEM: no free huge page just now, or the range changed; the rest may work.
    return done


def _resident_ranges() -> Iterator[tuple[int, int]]:
    """(start, length) runs of 2 MB-aligned ranges inside private anonymous mappings whose
    pages are all resident."""
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps.read().splitlines():
            fields = line.split()
            if fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
                continue
            low, high = (int(value, 16) for value in fields[0].split("-"))
            run_start, run_length = 0, 0
            for start in range(-(-low // HUGE) * HUGE, high // HUGE * HUGE, HUGE):
                if _all_resident(pagemap, start):
                    if run_length and run_start + run_length == start:
                        run_length += HUGE
                        continue
                    if run_length:
                        yield run_start, run_length
                    run_start, run_length = start, HUGE
            if run_length:
                yield run_start, run_length


def _all_resident(pagemap, start: int) -> bool:
    pages = HUGE // _PAGE
    pagemap.seek(start // _PAGE * 8)
    entries = memoryview(pagemap.read(pages * 8)).cast("Q")
    return len(entries) == pages and all(entry & _PRESENT for entry in entries)

