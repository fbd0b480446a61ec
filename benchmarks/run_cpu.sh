#!/usr/bin/env bash
# Benchmark on this machine, side by side in one run: HF one at a time (a), HF static batches
# (b), the engine (c) and the full stack (d): `rayinfer head` plus one `rayinfer worker` that
# gets every core, driven over HTTP. Results: benchmarks/results/cpu.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
RAYINFER=.venv/bin/rayinfer
work=$(mktemp -d)
trap 'kill -TERM ${worker:-} ${head:-} 2>/dev/null || true; wait || true; rm -rf "$work"' EXIT
export RAY_AUTH_MODE=disabled
cat > "$work/head.yaml" <<YAML
head: {ray_port: 26379, include_dashboard: false, gateway_port: 28000, node_ip: 127.0.0.1}
ports: {node_manager: 26380, object_manager: 26381, runtime_env_agent: 26382,
        dashboard_agent_grpc: 26383, dashboard_agent_http: 26384, metrics_export: 26385,
        client_server: 26386, min_worker_port: 26400, max_worker_port: 26450}
YAML
cat > "$work/worker.yaml" <<YAML
worker: {node_ip: 127.0.0.2, num_cpus: $(nproc), models: [smollm2]}
engine: {max_batch_size: 64}
logging: {log_prompts: false, level: WARNING}
ports: {node_manager: 26480, object_manager: 26481, runtime_env_agent: 26482,
        dashboard_agent_grpc: 26483, dashboard_agent_http: 26484, metrics_export: 26485,
        client_server: 26486, min_worker_port: 26500, max_worker_port: 26550}
YAML
$RAYINFER head --config "$work/head.yaml" >"$work/head.log" 2>&1 & head=$!
until $RAYINFER health --role head --port 28000 -q 2>/dev/null; do sleep 1; done
$RAYINFER worker --config "$work/worker.yaml" --head 127.0.0.1:26379 >"$work/worker.log" 2>&1 & worker=$!
until $RAYINFER --url http://127.0.0.1:28000 health -q 2>/dev/null; do sleep 2; done
$RAYINFER bench "$@" --gateway http://127.0.0.1:28000 --out benchmarks/results/cpu.json
