"""A worker setting through the full stack, side by side: `rayinfer head` plus one `rayinfer
worker` with every core, restarted for each value of one `engine.` setting in turn (values
alternate, round after round), each time driven over HTTP by `rayinfer bench`'s load generator
with the workload `rayinfer bench` gives its (d) rows (2 requests per client, 64-128 new
tokens, seed 0: the same prompts and lengths as benchmarks/run_cpu.sh), after an untimed pass
of the same requests (--no-warm-up: without). Prints tok/s and p50 time to first token per
run, then the medians and their ratio to the first value's.

    .venv/bin/python benchmarks/stack_settings.py openmp_spin_count 3000000 null -c 64 \\
        --rounds 2 --out benchmarks/results/stack-openmp-spin-count.json
    .venv/bin/python benchmarks/stack_settings.py kv_cache_dtype bfloat16 auto --set quantize=int8

Values are YAML (null, true, 25). Uses the ports of benchmarks/local_stack.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import fixed_settings
import yaml
from local_stack import head_and_worker

from ray_inference.bench.offline import gateway_run
from ray_inference.bench.prompts import Workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", help="an engine: key, e.g. openmp_spin_count")
    parser.add_argument("values", nargs="+", help="its values (YAML), the first is the base")
    parser.add_argument("-c", "--concurrency", type=int, action="append")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="time each worker's first pass (default: a pass untimed first)")
    parser.add_argument("--set", dest="fixed", action="append", default=[],
                        metavar="FIELD=VALUE", help="another engine: key's value in every run")
    args = parser.parse_args()
    values = [yaml.safe_load(v) for v in args.values]
    try:
        fixed = fixed_settings.parse(args.fixed, args.setting)
    except ValueError as exc:
        parser.error(f"--set {exc}")
    concurrency = args.concurrency or [64]
    # Drawn once for the most clients; fewer clients take its head, as in `rayinfer bench`.
    work = Workload.make(2 * max(concurrency), 64, 128, 0)
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        for round_ in range(1, args.rounds + 1):
            for value in values:
                with head_and_worker(Path(directory), {
                        **fixed, args.setting: value, "max_batch_size": max(concurrency)}) as url:
                    for c in concurrency:
                        if args.warm_up:  # untimed, as `rayinfer bench` warms each variant
                            gateway_run(url, "smollm2", work.head(2 * c), c, None)
                        row = gateway_run(url, "smollm2", work.head(2 * c), c, None)
                        runs.append({"value": value, "round": round_, **row.to_dict()})
                        print(f"round {round_}  {args.setting}={value!s:10}  {c:3d} clients  "
                              f"{row.tok_s:7.1f} tok/s  TTFT p50 {row.ttft_p50_s:.3f} s "
                              f"(steady {row.ttft_steady_p50_s:.3f} s)  errors {row.errors}",
                              flush=True)
    print(f"medians over {args.rounds} rounds:")
    for c in concurrency:
        base = None
        for value in values:
            mine = [r for r in runs if r["value"] == value and r["concurrency"] == c]
            tok_s = statistics.median(r["tok_s"] for r in mine)
            steady = statistics.median(r["ttft_steady_p50_s"] for r in mine)
            base = base or tok_s
            print(f"  {c:3d} clients  {args.setting}={value!s:10}  {tok_s:7.1f} tok/s "
                  f"({tok_s / base:.2f}x)  steady TTFT p50 {steady:.3f} s")
    if args.out:
        args.out.write_text(json.dumps({"setting": args.setting, "values": values,
                                        "fixed": fixed, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
