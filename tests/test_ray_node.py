"""`RayNode`, the owner of a node's `ray start --block`, with real processes.

A shell script stands in for `ray start`: it prints the line RayNode waits for and leaves a
child behind that ignores SIGTERM, as the raylet's agents outlive `ray start` when the head
goes away at the same moment (tests/test_processes.py stops a real head and worker together).
"""

from __future__ import annotations

import time
from pathlib import Path

from ray_inference.node.ray_process import RayNode, running


def stand_in(pid_file: Path) -> RayNode:
    script = (f"sh -c 'trap \"\" TERM; exec sleep 300' & echo $! > {pid_file}; "
              "echo 'Ray runtime started.'; trap 'exit 0' TERM; "
              "while :; do sleep 0.1; done")
    return RayNode(["sh", "-c", script])  # RayNode adds --block: the script's $0


def test_stop_ends_the_processes_ray_start_leaves_behind(tmp_path):
    pid_file = tmp_path / "straggler.pid"
    node = stand_in(pid_file)
    node.start(timeout_s=10)
    straggler = int(pid_file.read_text())
    assert node.alive() and running(straggler)
    began = time.monotonic()
    node.stop(stragglers_s=1)
    assert not node.alive()
    assert not running(straggler)
    assert time.monotonic() - began < 5


def test_a_node_that_exited_on_its_own_still_takes_its_stragglers_down(tmp_path):
    pid_file = tmp_path / "straggler.pid"
    node = stand_in(pid_file)
    node.start(timeout_s=10)
    straggler = int(pid_file.read_text())
    node._process.terminate()  # as when `ray start` dies first
    node._process.wait(5)
    assert running(straggler)
    node.stop(stragglers_s=0.5)
    assert not running(straggler)
