"""The CPU benchmark on this machine, side by side in one run: HF one at a time (a), HF static
batches (b), the engine (c) and the full stack (d): `rayinfer head` plus `rayinfer worker`s
(benchmarks/local_stack.py) driven over HTTP by `rayinfer bench`, whose options follow.
Results: benchmarks/results/cpu.{json,png}; the peak memory of the head's processes:
benchmarks/results/head-memory.json. WORKERS=2 starts two worker nodes that split the cores
(results: cpu-2-workers.*, head-memory-2-workers.json); QUANTIZE=int8 runs (c) and the workers
with `engine.quantize: int8` (results: cpu-int8.*, head-memory-int8.json). Each worker batches
up to 64 requests.

    benchmarks/run_cpu.sh -c 16 -c 64 --min-tokens 64 --max-tokens 128
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from head_memory import peak_memory, report
from local_stack import RAYINFER, URL, start_head, start_worker, stop

from ray_inference.config import EngineConfig

RESULTS = Path(__file__).resolve().parent / "results"


def main(bench_args: list[str]) -> int:
    workers = int(os.environ.get("WORKERS", "1"))
    quantize = os.environ.get("QUANTIZE", "none")
    EngineConfig(quantize=quantize)  # a wrong QUANTIZE fails here, not in a worker's log
    suffix = ("" if workers == 1 else f"-{workers}-workers") + (
        "" if quantize == "none" else f"-{quantize}")
    cpus = max(1, (os.cpu_count() or 1) // workers)
    started: list[subprocess.Popen] = []
    peak: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        head = start_head(Path(directory))
        done = threading.Event()
        sampler = threading.Thread(target=lambda: peak.update(peak_memory(head.pid, done.is_set)))
        sampler.start()
        try:
            for index in range(1, workers + 1):
                started.append(start_worker(Path(directory), {"max_batch_size": 64,
                                                              "quantize": quantize}, index, cpus))
            bench = subprocess.run([str(RAYINFER), "bench", *bench_args, "--gateway", URL,
                                    "--quantize", quantize,
                                    "--out", str(RESULTS / f"cpu{suffix}.json")], check=False)
        finally:
            done.set()
            sampler.join()
            for process in [*started, head]:
                stop(process)
    report(peak, RESULTS / f"head-memory{suffix}.json")
    return bench.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
