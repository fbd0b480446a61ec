"""The runtime config: shipped profiles load, bad values are named, env vars interpolate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ray_inference import config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("profile", ["laptop.yaml", "full.yaml"])
def test_shipped_profiles_load(profile):
    loaded = config.load(ROOT / "config" / profile, env={})
    assert loaded.worker.models == ["smollm2"]
    assert loaded.head.dashboard_host == "127.0.0.1"
    assert loaded.head.api_key is None


def test_laptop_profile_matches_the_seed():
    loaded = config.load(ROOT / "config" / "laptop.yaml", env={})
    assert loaded.worker.num_cpus == 2
    assert 500_000_000 <= loaded.head.memory <= 1_000_000_000
    assert 2_000_000_000 <= loaded.worker.memory <= 3_000_000_000


def test_env_interpolation_types_and_defaults():
    env = {"RAY_HEAD_ADDRESS": "head:6379", "CPUS": "4"}
    loaded = config.from_dict({"worker": {"head_address": "${RAY_HEAD_ADDRESS}",
                                          "num_cpus": "${CPUS}",
                                          "models": ["${MODEL:-smollm2}"]}}, env=env)
    assert loaded.worker.head_address == "head:6379"
    assert loaded.worker.num_cpus == 4
    assert loaded.worker.models == ["smollm2"]


def test_missing_env_var_is_named():
    with pytest.raises(config.ConfigError, match=r"worker.head_address: environment variable "
                                                 r"RAY_HEAD_ADDRESS is not set"):
        config.from_dict({"worker": {"head_address": "${RAY_HEAD_ADDRESS}"}}, env={})


@pytest.mark.parametrize(("data", "needle"), [
    ({"worker": {"num_cpu": 2}}, "worker.num_cpu: unknown key"),
    ({"wrker": {}}, "wrker: unknown key"),
    ({"worker": {"num_cpus": 0}}, "worker.num_cpus: 0 is not allowed"),
    ({"engine": {"dtype": "int3"}}, "engine.dtype: 'int3' is not allowed"),
    # A value that fits none of a field's types: one clause naming the key, every type's rule.
    ({"engine": {"prepack_weights": "blas"}}, "engine.prepack_weights: 'blas' is not allowed: Input "
     "should be a valid boolean, unable to interpret input or Input should be 'mkl' or 'onednn'"),
    ({"head": {"gateway_port": 70000}}, "head.gateway_port: 70000"),
    ({"worker": {"models": []}}, "worker.models"),
    ({"worker": {"num_gpus": -1}}, "worker.num_gpus"),
    ({"engine": {"pack_arrivals": -2}}, "engine.pack_arrivals: -2 is not allowed"),
    ({"engine": {"pack_arrivals": "often"}}, "engine.pack_arrivals: 'often' is not allowed"),
])
def test_bad_values_name_key_value_and_rule(data, needle):
    with pytest.raises(config.ConfigError) as info:
        config.from_dict(data, env={})
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("value", "parsed"), [(32, 32), ("8", 8), (True, True), ("false", False),
                                               (0, False)])
def test_pack_arrivals_takes_a_row_count_or_always_or_never(value, parsed):
    engine = config.from_dict({"engine": {"pack_arrivals": value}}, env={}).engine
    assert engine.pack_arrivals == parsed and type(engine.pack_arrivals) is type(parsed)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("head: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML at line"):
        config.load(bad)


def test_cli_reports_bad_config_in_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker:\n  num_cpus: lots\n")
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "rayinfer"), "worker", "--config",
                           str(bad), "--head", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "worker.num_cpus" in lines[0] and "'lots'" in lines[0]


def test_openmp_spin_count_reaches_the_actors_runtime_env_unless_null():
    from ray_inference.node.deploy import actor_runtime_env

    assert actor_runtime_env(config.from_dict({})) == {
        "env_vars": {"GOMP_SPINCOUNT": "3000000"}}
    assert actor_runtime_env(config.from_dict({"engine": {"openmp_spin_count": None}})) is None
    with pytest.raises(config.ConfigError, match=r"engine\.openmp_spin_count: -1"):
        config.from_dict({"engine": {"openmp_spin_count": -1}})
