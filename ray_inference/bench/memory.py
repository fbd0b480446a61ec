"""Memory of a process tree (psutil): what `benchmarks/head_memory.py` samples while the
cluster is under load, and what the tests inspect in the head's processes."""

from __future__ import annotations

import psutil


def process_tree(root: int) -> list[int]:
    """`root` and every process below it ([] once `root` is gone)."""
    try:
        parent = psutil.Process(root)
        return [root, *(child.pid for child in parent.children(recursive=True))]
    except psutil.Error:
        return []


def command(pid: int) -> str:
    """The process's command line ('' once it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def maps_library(pid: int, name: str) -> bool:
    """Whether the process has a shared library whose path contains `name` mapped."""
    try:
        return any(name in region.path for region in psutil.Process(pid).memory_maps())
    except psutil.Error:
        return False


def rss_pss(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in bytes; PSS splits shared pages between the processes that map them."""
    try:
        memory = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return None
    return memory.rss, memory.pss


def tree_memory(root: int) -> dict[int, tuple[int, int]]:
    """(RSS, PSS) of `root` and every process below it that is still there, by pid."""
    return {pid: memory for pid in process_tree(root) if (memory := rss_pss(pid))}
