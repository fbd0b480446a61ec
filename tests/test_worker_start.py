"""What `rayinfer worker` checks before it starts Ray, as a user meets it: real processes, a
real TCP port on 127.0.0.1 that nothing listens on, and one that the test listens on."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ray_inference.config import ConfigError
from ray_inference.node.ray_process import split_address, wait_for_head

RAYINFER = str(Path(sys.executable).parent / "rayinfer")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(tmp_path: Path, config: str, head: str) -> tuple[subprocess.CompletedProcess,
                                                                  float]:
    path = tmp_path / "worker.yaml"
    path.write_text(config)
    began = time.monotonic()
    done = subprocess.run([RAYINFER, "worker", "--config", str(path), "--head", head],
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - began


def test_a_worker_whose_head_does_not_answer_exits_with_one_clear_line(tmp_path):
    port = closed_port()
    done, took = start_worker(tmp_path, "worker:\n  head_wait_s: 2\n", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert took < 30  # `ray start` alone took two minutes to give up, silently
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: the head's Ray port 127.0.0.1:{port} did not answer within 2 s "
                      "(Connection refused): start `rayinfer head` there first, or check the "
                      "address and that this host may reach that port"]
    assert "Traceback" not in done.stderr
    assert "waiting for the head" in done.stderr  # it said what it was doing meanwhile


def test_a_worker_with_a_missing_model_fails_before_starting_ray(tmp_path):
    done, took = start_worker(tmp_path, "worker:\n  models: [/nowhere/tinyllama.gguf]\n",
                              f"127.0.0.1:{closed_port()}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        "Error: model tinyllama: /nowhere/tinyllama.gguf does not exist"
    assert took < 30


def test_waiting_for_the_head_ends_when_its_port_opens():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    opener = threading.Timer(1.0, listener.listen)  # the head comes up a second later
    opener.start()
    try:
        began = time.monotonic()
        wait_for_head(f"127.0.0.1:{port}", timeout_s=20)
        assert 0.9 < time.monotonic() - began < 10
    finally:
        opener.cancel()
        listener.close()


@pytest.mark.parametrize("address", ["head", "head:", ":6379", "head:port", "head:70000"])
def test_a_head_address_must_be_host_and_port(address):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        split_address(address)


def test_an_ipv6_head_address_keeps_its_host():
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("10.0.0.1:6379") == ("10.0.0.1", 6379)
