"""Peak memory of the head's processes while the cluster is under load.

The head is `rayinfer head` and every process below it: the gateway (in the same process),
the Ray head (GCS, raylet, dashboard, agents) and the coordinator actor. Samples RSS and PSS
(shared pages split between the processes that map them) every half second and prints the
peak of the sums and of each process, until the given process ends or `--seconds` pass.

    .venv/bin/python benchmarks/head_memory.py --pid PID_OF_RAYINFER_HEAD --seconds 60
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from ray_inference.bench.memory import command, tree_memory


def peak_memory(pid: int, done: Callable[[], bool]) -> dict:
    """Sample `pid`'s process tree every half second until it ends or `done()`; the peaks."""
    peak = {"rss_bytes": 0, "pss_bytes": 0}
    processes: dict[int, dict] = {}  # by pid: a process's title changes while it works
    while not done() and Path(f"/proc/{pid}").exists():
        sample = tree_memory(pid)
        peak["rss_bytes"] = max(peak["rss_bytes"], sum(rss for rss, _ in sample.values()))
        peak["pss_bytes"] = max(peak["pss_bytes"], sum(pss for _, pss in sample.values()))
        for p, (rss, _) in sample.items():
            seen = processes.setdefault(p, {"command": command(p)[:60], "rss_bytes": 0})
            seen["rss_bytes"] = max(seen["rss_bytes"], rss)
        time.sleep(0.5)
    peak["processes"] = sorted(processes.values(), key=lambda p: -p["rss_bytes"])
    return peak


def report(peak: dict, out: Path | None = None) -> None:
    print(f"head processes, peak sum: RSS {peak['rss_bytes'] / 2**20:.0f} MiB, "
          f"PSS {peak['pss_bytes'] / 2**20:.0f} MiB")
    for process in peak["processes"]:
        print(f"  {process['rss_bytes'] / 2**20:7.0f} MiB  {process['command']}")
    if out:
        out.write_text(json.dumps(peak, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True, help="the `rayinfer head` process")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, help="also write the peaks here as JSON")
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    report(peak_memory(args.pid, lambda: time.monotonic() > deadline), args.out)


if __name__ == "__main__":
    main()
