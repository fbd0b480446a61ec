#!/usr/bin/env bash
# The CPU benchmark, side by side in one run (a: HF one at a time, b: HF static batches,
# c: the engine, d: head + worker over HTTP); benchmarks/run_cpu.py says what it writes.
# WORKERS=2 starts two worker nodes that split the cores; QUANTIZE=int8 runs the engine in int8;
# KV_CACHE_DTYPE=bfloat16 keeps its KV cache in bf16; LABEL=name adds -name to the results' names.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_AUTH_MODE=disabled exec .venv/bin/python benchmarks/run_cpu.py "$@"
