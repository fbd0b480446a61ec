"""Memory of a process tree, read from /proc (Linux): what `benchmarks/head_memory.py`
samples while the cluster is under load, and what the tests inspect in the head's processes."""

from __future__ import annotations

from pathlib import Path


def process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def command(pid: int) -> str:
    """The process's command line ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""


def maps_library(pid: int, name: str) -> bool:
    """Whether the process has a shared library whose path contains `name` mapped."""
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def rss_pss(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in bytes; PSS splits shared pages between the processes that map them."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return None
    fields = {key: int(value.split()[0]) * 1024 for key, value in
              (line.split(":", 1) for line in lines)}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def tree_memory(root: int) -> dict[int, tuple[int, int]]:
    """(RSS, PSS) of `root` and every process below it that is still there, by pid."""
    return {pid: memory for pid in process_tree(root) if (memory := rss_pss(pid))}
