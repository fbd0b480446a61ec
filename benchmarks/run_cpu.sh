#!/usr/bin/env bash
# Benchmark on this machine, side by side in one run: HF one at a time (a), HF static batches
# (b), the engine (c) and the full stack (d): `rayinfer head` plus one `rayinfer worker` that
# gets every core, driven over HTTP. Results: benchmarks/results/cpu.{json,png}, and the peak
# memory of the head's processes in benchmarks/results/head-memory.json.
# WORKERS=2 starts two worker nodes that split the cores (results: cpu-2-workers.*).
set -euo pipefail
cd "$(dirname "$0")/.."
RAYINFER=.venv/bin/rayinfer
workers=${WORKERS:-1}
cpus=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
suffix=$([ "$workers" = 1 ] && echo "" || echo "-$workers-workers")
work=$(mktemp -d)
pids=()
trap 'kill -TERM ${pids[@]:-} ${head:-} 2>/dev/null || true; wait || true; rm -rf "$work"' EXIT
export RAY_AUTH_MODE=disabled
cat > "$work/head.yaml" <<YAML
head: {ray_port: 26379, include_dashboard: false, gateway_port: 28000, node_ip: 127.0.0.1}
ports: {node_manager: 26380, object_manager: 26381, runtime_env_agent: 26382,
        dashboard_agent_grpc: 26383, dashboard_agent_http: 26384, metrics_export: 26385,
        client_server: 26386, min_worker_port: 26400, max_worker_port: 26450}
YAML
$RAYINFER head --config "$work/head.yaml" >"$work/head.log" 2>&1 & head=$!
until $RAYINFER health --role head --port 28000 -q 2>/dev/null; do sleep 1; done
.venv/bin/python benchmarks/head_memory.py --pid "$head" --seconds 3600 \
    --out "benchmarks/results/head-memory$suffix.json" &  # ends, and prints, with the head
for i in $(seq 1 "$workers"); do
  port=$((26380 + 100 * i))
  cat > "$work/worker$i.yaml" <<YAML
worker: {node_ip: 127.0.0.$((i + 1)), num_cpus: $cpus, models: [smollm2]}
engine: {max_batch_size: 64}
logging: {log_prompts: false, level: WARNING}
ports: {node_manager: $port, object_manager: $((port + 1)), runtime_env_agent: $((port + 2)),
        dashboard_agent_grpc: $((port + 3)), dashboard_agent_http: $((port + 4)),
        metrics_export: $((port + 5)), client_server: $((port + 6)),
        min_worker_port: $((port + 20)), max_worker_port: $((port + 70))}
YAML
  $RAYINFER worker --config "$work/worker$i.yaml" --head 127.0.0.1:26379 \
      >"$work/worker$i.log" 2>&1 & pids+=($!)
  # One at a time: two nodes starting at once on two cores can miss Ray's start-up timeout.
  until [ "$($RAYINFER --url http://127.0.0.1:28000 actors 2>/dev/null | grep -c ready)" -ge "$i" ]; do
    kill -0 "${pids[-1]}" || { tail -5 "$work/worker$i.log"; exit 1; }
    sleep 2
  done
done
$RAYINFER bench "$@" --gateway http://127.0.0.1:28000 --out "benchmarks/results/cpu$suffix.json"
