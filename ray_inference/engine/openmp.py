"""Keep one OpenMP thread team per process, the engine thread's.

PyTorch's CPU kernels run on GNU OpenMP, and libgomp keeps a team of worker threads for every
thread that has run a parallel region. Once the threads of all teams outnumber the cores,
libgomp stops spinning between parallel regions and parks its workers on a futex instead, and
every small kernel pays for the wake-up. Measured on a 2-core machine: after the model was
loaded on the main thread, the engine thread ran a 64x576 @ 576x1536 bf16 matmul in 215 us
instead of 105 us and an elementwise multiply in 70 us instead of 11 us, and SmolLM2's decode
step at 64 rows took 150 ms; with the main thread's team released, 85 ms.

The thread that loads the model (and times dtypes) is done with torch once the engine starts,
so its team is released here. A libgomp team can only be released by the thread that owns it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)
_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free every resource, threads included


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """torch's own libgomp when it has one; None where torch uses another runtime."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    for name in [str(p) for p in bundled] + ["libgomp.so.1"]:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(library, "omp_pause_resource_all"):
            return library
    return None


def release_calling_thread_team() -> bool:
    """Free the OpenMP worker threads of the calling thread (they come back if it runs torch
    again). Returns whether a team was released; a no-op outside GNU OpenMP."""
    library = _libgomp()
    if library is None:
        return False
    released = library.omp_pause_resource_all(_OMP_PAUSE_HARD) == 0
    if not released:
        log.debug("libgomp refused to release this thread's OpenMP team")
    return released
