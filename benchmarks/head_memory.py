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
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _tree(root: int) -> list[int]:
    children, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _memory(pid: int) -> tuple[str, int, int] | None:
    """(name, RSS bytes, PSS bytes) of one process."""
    try:
        name = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:60]
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return None
    kib = {key: int(value.split()[0]) * 1024 for key, value in fields.items()}
    return name, kib.get("Rss", 0), kib.get("Pss", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True, help="the `rayinfer head` process")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, help="also write the peaks here as JSON")
    args = parser.parse_args()
    peak = {"rss_bytes": 0, "pss_bytes": 0, "processes": {}}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and Path(f"/proc/{args.pid}").exists():
        sample = [m for m in map(_memory, _tree(args.pid)) if m]
        peak["rss_bytes"] = max(peak["rss_bytes"], sum(rss for _, rss, _ in sample))
        peak["pss_bytes"] = max(peak["pss_bytes"], sum(pss for _, _, pss in sample))
        for name, rss, _ in sample:
            peak["processes"][name] = max(peak["processes"].get(name, 0), rss)
        time.sleep(0.5)
    print(f"head processes, peak sum: RSS {peak['rss_bytes'] / 2**20:.0f} MiB, "
          f"PSS {peak['pss_bytes'] / 2**20:.0f} MiB")
    for name, rss in sorted(peak["processes"].items(), key=lambda item: -item[1]):
        print(f"  {rss / 2**20:7.0f} MiB  {name}")
    if args.out:
        args.out.write_text(json.dumps(peak, indent=2))


if __name__ == "__main__":
    main()
