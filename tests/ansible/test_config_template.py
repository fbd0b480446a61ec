"""templates/rayinfer.yaml.j2 renders, for every inventory, a config the runtime accepts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_inference import config

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = Path(sys.executable).parent / "ansible"


def _keys(tree, prefix=""):
    if not isinstance(tree, dict):
        return set()
    found = set()
    for key, value in tree.items():
        found.add(prefix + key)
        found |= _keys(value, f"{prefix}{key}.")
    return found


def _render(inventory: str, host: str, dest: Path, vcpus: int) -> None:
    """Render as a play does on `host`, whose facts (gathered there) say it has `vcpus`."""
    result = subprocess.run(
        [str(ANSIBLE), "-i", inventory, host, "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}",
         "-e", json.dumps({"ansible_facts": {"processor_vcpus": vcpus}}),
         "-m", "ansible.builtin.template",
         "-a", f"src=templates/rayinfer.yaml.j2 dest={dest} mode=0600"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("inventory", "host", "vcpus", "cpus", "gpus", "replicas"), [
    # rayinfer_worker_cpus: auto shares the host's vCPUs among its worker containers (two in
    # laptop mode: a worker each on two cores, not two workers on the same two).
    ("inventory/local.yml", "localhost", 8, 4, 0, 1),
    ("inventory/local.yml", "localhost", 1, 1, 0, 1),
    ("inventory/hosts.example.yml", "head-01", 32, 32, "auto", 1),  # one container: every vCPU
    ("inventory/hosts.example.yml", "gpu-01", 64, 16, 4, 1),  # set per host
    ("inventory/hosts.example.yml", "cpu-01", 64, 8, 0, 2),
])
def test_rendered_config_is_valid(tmp_path, inventory, host, vcpus, cpus, gpus, replicas):
    dest = tmp_path / "config.yaml"
    _render(inventory, host, dest, vcpus)

    cfg = config.load(dest, env={"RAYINFER_GATEWAY_HOST": "0.0.0.0"})

    assert cfg.worker.num_cpus == cpus
    assert cfg.worker.num_gpus == gpus
    assert cfg.worker.replicas == replicas
    assert cfg.head.gateway_host == "0.0.0.0"
    assert cfg.head.dashboard_host == "127.0.0.1"
    laptop = yaml.safe_load((ROOT / "config/laptop.yaml").read_text())
    assert _keys(yaml.safe_load(dest.read_text())) == _keys(laptop)
