"""Why the engine releases its creator's OpenMP team (ray_inference/engine/openmp.py).

Side by side in one process: the same bf16 kernels timed on the main thread, on a second
thread while the main thread's OpenMP team is alive (an engine thread after the model was
loaded on the main thread), and on a second thread after the main thread released its team.
Prints microseconds per call and the ratio to the main thread.

    .venv/bin/python benchmarks/openmp_teams.py
"""

from __future__ import annotations

import threading
import time

import torch

from ray_inference.engine.openmp import release_calling_thread_team

CALLS = 2000


def timings() -> dict[str, float]:
    x = torch.randn(64, 576, dtype=torch.bfloat16)  # a decode step's rows for SmolLM2-135M
    w = torch.randn(1536, 576, dtype=torch.bfloat16)
    h = torch.randn(64, 1536, dtype=torch.bfloat16)
    kernels = {"linear 64x576 @ 576x1536": lambda: torch.nn.functional.linear(x, w),
               "multiply 64x1536": lambda: h * h}
    result = {}
    for name, kernel in kernels.items():
        for _ in range(50):
            kernel()
        start = time.perf_counter()
        for _ in range(CALLS):
            kernel()
        result[name] = (time.perf_counter() - start) / CALLS * 1e6
    return result


def on_thread() -> dict[str, float]:
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(timings()))
    worker.start()
    worker.join()
    return result


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    variants = {"main thread": timings(), "second thread, main's team alive": on_thread()}
    released = release_calling_thread_team()
    variants[f"second thread, main's team released ({released})"] = on_thread()
    base = variants["main thread"]
    for kernel in base:
        print(f"\n{kernel}")
        for variant, values in variants.items():
            print(f"  {variant:<48} {values[kernel]:8.1f} us  x{values[kernel] / base[kernel]:.2f}")


if __name__ == "__main__":
    main()
