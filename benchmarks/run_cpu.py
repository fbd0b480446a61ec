"""The CPU benchmark on this machine, side by side in one run: HF one at a time (a), HF static
batches (b), the engine (c) and the full stack (d): `rayinfer head` plus `rayinfer worker`s
(benchmarks/local_stack.py) driven over HTTP by `rayinfer bench`, whose options follow.
Results: benchmarks/results/cpu.{json,png}; the peak memory of the head's processes:
benchmarks/results/head-memory.json. WORKERS=2 starts two worker nodes that split the cores
(results: cpu-2-workers.*, head-memory-2-workers.json); QUANTIZE=int8 runs (c) and the workers
with `engine.quantize: int8` (results: cpu-int8.*, head-memory-int8.json), KV_CACHE_DTYPE=bfloat16
with `engine.kv_cache_dtype: bfloat16` (results: cpu-bfloat16-kv.*, or cpu-int8-bfloat16-kv.*
with both); LABEL=name adds -name to every result's name. Each worker batches up to 64
requests. With `--http-only` only the full stack runs (d), loaded by `rayinfer bench`
(results: cpu-http-only.*, head-memory-http-only.json).

    benchmarks/run_cpu.sh -c 16 -c 64 --min-tokens 64 --max-tokens 128
    benchmarks/run_cpu.sh --http-only -c 64 --requests-per-client 4
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
    numerics = {"quantize": os.environ.get("QUANTIZE", "none"),
                "kv_cache_dtype": os.environ.get("KV_CACHE_DTYPE", "auto")}
    EngineConfig(**numerics)  # a wrong value fails here, not in a worker's log
    # --http-only: the stack alone, whose workers already run as `numerics` say.
    http_only = "--http-only" in bench_args
    suffix = ("" if workers == 1 else f"-{workers}-workers") + (
        "" if numerics["quantize"] == "none" else f"-{numerics['quantize']}") + (
        "" if numerics["kv_cache_dtype"] == "auto" else f"-{numerics['kv_cache_dtype']}-kv") + (
        "-http-only" if http_only else "") + (
        f"-{os.environ['LABEL']}" if os.environ.get("LABEL") else "")
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
                started.append(start_worker(Path(directory), {"max_batch_size": 64, **numerics},
                                            index, cpus))
            local = [] if http_only else [
                "--quantize", numerics["quantize"], "--kv-cache-dtype", numerics["kv_cache_dtype"]]
            bench = subprocess.run([str(RAYINFER), "bench", *bench_args, "--gateway", URL, *local,
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
