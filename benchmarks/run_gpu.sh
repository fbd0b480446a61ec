#!/usr/bin/env bash
# The engine alone on a CUDA machine (no Ray, no Docker, nothing downloaded; python with torch
# and transformers): the decode step with transformers' attention against rayinfer's
# (gpu_step.py), then the engine's variants against HF padded batches (gpu_engine.py), both
# for the SmolLM2-135M and Llama-1.24B shapes. Results and logs go to $1 (default:
# benchmarks/results/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
python=${PYTHON:-python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
$python benchmarks/gpu_step.py --out "$out/step.json" 2>&1 | tee "$out/step.log"
$python benchmarks/gpu_engine.py --variants "${VARIANTS:-padded,engine_graphs_hf_attention,engine_graphs,engine}" \
    --out "$out/engine.json" 2>&1 | tee "$out/engine.log"
