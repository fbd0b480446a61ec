"""What `rayinfer head` and `rayinfer worker` check before they start Ray, as a user meets it:
real processes, real TCP ports on 127.0.0.1 (one nothing listens on, ones the test holds)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ray_inference.config import Config, ConfigError, RayPorts
from ray_inference.node.ray_process import ports_to_bind, split_address, wait_for_head
from tests.conftest import free_port

RAYINFER = str(Path(sys.executable).parent / "rayinfer")


def start_node(tmp_path: Path, config: str, *args: str) -> tuple[subprocess.CompletedProcess,
                                                                  float]:
    """`rayinfer ARGS --config` with this config, to its exit; and how long it ran."""
    path = tmp_path / "node.yaml"
    path.write_text(config)
    began = time.monotonic()
    done = subprocess.run([RAYINFER, *args, "--config", str(path)], capture_output=True,
                          text=True, timeout=120)
    return done, time.monotonic() - began


def start_worker(tmp_path: Path, head: str, worker: dict | None = None, **ports: int):
    """A worker with these `worker:` settings and Ray's ports left to Ray but `ports`."""
    config = {"worker": worker or {}, "ports": {**dict.fromkeys(RayPorts.model_fields, 0),
                                                 **ports}}
    return start_node(tmp_path, yaml.safe_dump(config), "worker", "--head", head)


def held_port() -> socket.socket:
    """A port something else already listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def test_a_worker_whose_head_does_not_answer_exits_with_one_clear_line(tmp_path):
    port = free_port()
    done, took = start_worker(tmp_path, f"127.0.0.1:{port}", {"head_wait_s": 2})
    assert done.returncode == 1
    assert took < 30  # `ray start` alone took two minutes to give up, silently
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: the head's Ray port 127.0.0.1:{port} did not answer within 2 s "
                      "(Connection refused): start `rayinfer head` there first, or check the "
                      "address and that this host may reach that port"]
    assert "Traceback" not in done.stderr
    assert "waiting for the head" in done.stderr  # it said what it was doing meanwhile


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_stopped_while_waiting_for_its_head_exits_cleanly(tmp_path, stop):
    """A stop signal while a node starts ends the start with one line and exit 0 (SIGTERM used
    to kill the process outright, rc -15; Ctrl-C ended it with 130)."""
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"worker": {"head_wait_s": 60}, "ports": dict.fromkeys(
        RayPorts.model_fields, 0)}))
    worker = subprocess.Popen([RAYINFER, "worker", "--config", str(config), "--head",
                               f"127.0.0.1:{free_port()}"], stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(60, worker.kill)  # a worker that never says it waits ends anyway
    guard.start()
    try:
        lines = (worker.stderr.readline() for _ in range(20))
        assert any("waiting for the head" in line for line in lines)
        worker.send_signal(stop)
        assert worker.wait(15) == 0
    finally:
        guard.cancel()
        worker.kill()
    output = worker.stderr.read()
    assert f"stopped by {stop.name} while starting; nothing is left running" in output
    assert "Traceback" not in output


def test_a_worker_with_a_missing_model_fails_before_starting_ray(tmp_path):
    done, took = start_worker(tmp_path, f"127.0.0.1:{free_port()}",
                              {"models": ["/nowhere/tinyllama.gguf"]})
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


@pytest.mark.parametrize("setting", ["head.ray_port", "head.gateway_port", "ports.node_manager"])
def test_a_head_whose_port_is_taken_says_which_at_once(tmp_path, setting):
    with held_port() as holder:
        port = holder.getsockname()[1]
        # Every other port free (or Ray's pick), whatever else runs on this machine.
        config = {"ports": dict.fromkeys(RayPorts.model_fields, 0),
                  "head": {"ray_port": free_port(), "gateway_port": free_port()}}
        section, key = setting.split(".")
        config[section][key] = port
        done, took = start_node(tmp_path, yaml.safe_dump(config), "head")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: port {port} ({setting}) cannot be used on this machine (Address already in "
        f"use): stop what listens there, or set {setting} to another port"]
    assert took < 30  # `ray start` took some 40 s; the gateway failed after a READY banner
    assert "READY" not in done.stdout + done.stderr


def test_a_worker_whose_port_is_taken_says_which_before_waiting_for_the_head(tmp_path):
    with held_port() as holder:
        port = holder.getsockname()[1]
        done, _ = start_worker(tmp_path, f"127.0.0.1:{free_port()}", metrics_export=port)
    assert done.returncode == 1
    assert "(ports.metrics_export) cannot be used" in done.stderr.strip().splitlines()[-1]


def test_the_ports_a_node_binds_leave_out_zeros_and_a_dashboard_that_is_off():
    config = Config.model_validate({"ports": {"node_manager": 0}})
    head = ports_to_bind(config, head=True)
    assert head["head.ray_port"] == ("", 6379)
    assert head["head.gateway_port"] == ("127.0.0.1", 8000)
    assert "ports.node_manager" not in head and "head.dashboard_port" not in head
    assert "ports.client_server" in head
    worker = ports_to_bind(config, head=False)
    assert not any(key.startswith("head.") for key in worker)
    assert "ports.client_server" not in worker  # only the head runs Ray's client server
    dashboard = Config.model_validate({"head": {"include_dashboard": True}})
    assert ports_to_bind(dashboard, head=True)["head.dashboard_port"] == ("127.0.0.1", 8265)
