"""What the head's optional Ray processes cost, side by side: an idle `rayinfer head` started with
each combination of `head.include_dashboard` and `head.autoscaler_monitor`, one after another
in one run, and the RSS and PSS summed over its processes once it is ready.

    .venv/bin/python benchmarks/head_settings_memory.py [--out FILE]

It starts heads with benchmarks/local_stack.py (its ports; nothing else may use them
meanwhile), and stops each one before the next.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from local_stack import start_head, stop

from ray_inference.bench.memory import command, tree_memory

VARIANTS = {  # name: (include_dashboard, autoscaler_monitor)
    "default (both off)": (False, False),
    "autoscaler monitor on": (False, True),
    "dashboard on": (True, False),
    "both on (the defaults before)": (True, True),
}


def measure(directory: Path, dashboard: bool, monitor: bool, settle_s: float) -> dict:
    head = start_head(directory, dashboard_port=28265, include_dashboard=dashboard,
                      autoscaler_monitor=monitor)
    try:
        time.sleep(settle_s)  # the dashboard's modules come up after the gateway answers
        sample = tree_memory(head.pid)
        return {"rss_bytes": sum(r for r, _ in sample.values()),
                "pss_bytes": sum(p for _, p in sample.values()),
                "processes": len(sample),
                "largest": sorted(((r, command(pid)[:60]) for pid, (r, _) in sample.items()),
                                  reverse=True)[:3]}
    finally:
        stop(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait after the gateway answers")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, (dashboard, monitor) in VARIANTS.items():
            results[name] = measure(Path(directory), dashboard, monitor, args.settle)
            row = results[name]
            print(f"{name:32s} RSS {row['rss_bytes'] / 2**20:6.0f} MiB  PSS "
                  f"{row['pss_bytes'] / 2**20:6.0f} MiB  {row['processes']} processes",
                  flush=True)
    base = results["default (both off)"]["rss_bytes"]
    for name, row in results.items():
        print(f"  {name:32s} {row['rss_bytes'] / base:5.2f}x the default's RSS")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
