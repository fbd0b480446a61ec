"""The runtime's one YAML config: loading, ${VAR} interpolation and strict validation.

Every key is declared here; an unknown key, a wrong type or an out-of-range value is a
ConfigError whose message names the key, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ray_inference.engine.types import KvCacheDtype, Quantize

ENV_CONFIG = "RAYINFER_CONFIG"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A config problem a person can fix; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_PORT = {"ge": 0, "le": 65535}
# engine.int4_max_rows: a row count, or auto.
Int4MaxRows = Annotated[int, Field(ge=0, le=4096)] | Literal["auto"]
# engine.pack_arrivals: the running requests from which arrivals are packed, or always/never.
PackArrivals = Annotated[int, Field(ge=1, le=4096)] | bool


class RayPorts(_Section):
    """Ray's own ports, pinned so a firewall can name them (0: Ray picks, for one-host tests)."""

    node_manager: int = Field(6380, **_PORT)
    object_manager: int = Field(6381, **_PORT)
    runtime_env_agent: int = Field(6382, **_PORT)
    dashboard_agent_grpc: int = Field(6383, **_PORT)
    dashboard_agent_http: int = Field(52365, **_PORT)
    metrics_export: int = Field(6384, **_PORT)
    client_server: int = Field(10001, **_PORT)
    min_worker_port: int = Field(10002, **_PORT)
    max_worker_port: int = Field(10199, **_PORT)


class HeadConfig(_Section):
    ray_port: int = Field(6379, ge=1024, le=65535)
    node_ip: str | None = None
    # Ray's dashboard: nine module processes, about 0.9 GiB more on the head
    # (benchmarks/head_settings_memory.py), and unauthenticated code execution for whoever
    # reaches it (CVE-2023-48022). Off unless asked for.
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1024, le=65535)
    # Ray's autoscaler monitor (about 80 MiB): rayinfer adds nodes through the inventory, never
    # through Ray's autoscaler. Without it `ray status` says "No cluster status"; `rayinfer
    # status` shows the cluster either way.
    autoscaler_monitor: bool = False
    object_store_memory: int = Field(100_000_000, ge=78_643_200)
    memory: int | None = Field(None, ge=100_000_000)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None
    max_in_flight: int = Field(1024, ge=1, le=1_000_000)

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value or None


class WorkerConfig(_Section):
    head_address: str | None = None
    node_ip: str | None = None
    num_cpus: int = Field(2, ge=1, le=1024)
    num_gpus: int | Literal["auto"] = "auto"
    replicas: int = Field(1, ge=1, le=64)
    object_store_memory: int = Field(200_000_000, ge=78_643_200)
    memory: int | None = Field(None, ge=100_000_000)
    models: list[str] = Field(default_factory=lambda: ["smollm2"], min_length=1)
    register_interval_s: float = Field(10.0, gt=0, le=3600)
    drain_timeout_s: float = Field(120.0, gt=0, le=86_400)
    head_wait_s: float = Field(120.0, gt=0, le=86_400)

    @field_validator("num_gpus")
    @classmethod
    def _gpus_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return value


class EngineConfig(_Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_queue: int = Field(256, ge=1, le=1_000_000)
    max_tokens_in_flight: int = Field(65_536, ge=64)
    default_max_tokens: int = Field(128, ge=1)
    torch_threads: int | None = Field(None, ge=1, le=1024)
    # Prompt tokens prefilled per step; lower lets the first of a burst of arrivals start
    # sooner, but on CPUs (measured at 128 and 256) it raised the p50 TTFT.
    max_prefill_tokens: int = Field(4096, ge=1)
    # Replay each decode step as a CUDA graph (GPU workers only; ignored on CPUs).
    cuda_graphs: bool = True
    # Hand out a decode step's tokens while the next step runs (default: on GPUs only).
    overlap_steps: bool | None = None
    # Once this many requests are running, one that arrives is prefilled inside the batch's next
    # decode step, not in a forward pass of its own (CPU workers, models that run SDPA through
    # transformers' attention interface): more tokens per second under load, a later first
    # token (docs/engine.md). Smaller batches keep admission between layers. true: at any batch
    # size; false: never.
    pack_arrivals: PackArrivals = 32
    # Where arrivals are not packed: one that arrives during a decode step is prefilled at the
    # next layer boundary, not after the step (eager steps only).
    admit_between_layers: bool = True
    # CPU workers, Llama-shaped models (SmolLM2, Llama 3): decode steps call each layer's
    # modules directly instead of through transformers' per-layer plumbing; the same logits,
    # less time a step (docs/engine.md). false: through the model's own forward.
    lean_decode: bool = True
    # Keep the K/V of a prompt start that recent prompts share (a chat template's system
    # prompt) and prefill only what follows it.
    prefix_cache: bool = True
    # CPU workers: pack each linear layer's weight once, at load, into the blocked layout the
    # kernels compute on, instead of within every matrix product (the same results, within
    # fp32 rounding in fp32; faster passes). true: bf16 for oneDNN, fp32 for MKL or oneDNN,
    # whichever multiplied faster when the worker started; mkl or onednn: that kernel; false:
    # weights as loaded.
    prepack_weights: bool | Literal["mkl", "onednn"] = True
    # CPU workers, generation models: run every linear layer but the output layer in int8
    # (weights rounded once per output channel, inputs per token; docs/engine.md). More tokens
    # per second, slightly different answers (SmolLM2's perplexity 2.6% higher), so off;
    # ignored on GPUs and by T5/BERT models.
    quantize: Quantize = "none"
    # CPU workers, generation models: products of at most this many rows (decode steps of a few
    # requests) multiply by a 4-bit copy of each linear weight but the output layer's (groups of
    # 32, as a Q4_1 GGUF stores them), a sixth of fp32's bytes to read: a lone request's tokens
    # came 1.5x as fast (docs/engine.md). Inputs are rounded to bf16. auto: 16 rows where the
    # model runs in fp32 and a layer's weights are 4-bit already (the packaged SmolLM2: the
    # copy holds the same weights), else none; a number gives every layer a copy (rounding
    # weights that are not 4-bit); 0: no copies. Ignored on GPUs.
    int4_max_rows: Int4MaxRows = "auto"
    # The KV cache's dtype; auto keeps the model's. bfloat16 on a CPU worker that runs fp32
    # holds the same tokens in half the memory and reads them faster in decode attention;
    # rounded K/V change answers slightly (docs/engine.md). Models whose attention does not go
    # through the engine's own (T5/BERT, non-SDPA models) keep the model's dtype.
    kv_cache_dtype: KvCacheDtype = "auto"
    # Stream messages per second one actor sends over all its requests: under load each
    # request's tokens go out together every (running requests / this) seconds. 0: no limit.
    stream_messages_per_s: int = Field(100, ge=0)
    # How long an idle OpenMP worker thread of an inference actor spins before it sleeps
    # (libgomp's GOMP_SPINCOUNT, set when Ray starts the actor: 3,000,000 is about 35 ms on the
    # 2-core Xeon, libgomp's own default about 5 ms). A thread that slept on a busy machine waits
    # for a core at the next kernel; null keeps libgomp's default.
    openmp_spin_count: int | None = Field(3_000_000, ge=0)
    # CPU engines keep their weights (collapsed once in place, MADV_COLLAPSE, Linux 6.1+) and
    # KV cache on 2 MB transparent huge pages (huge_pages.py): fewer TLB misses in every step.
    huge_pages: bool = True
    # Seconds a CPU engine whose batch emptied keeps its KV cache's buffers for the requests
    # that come next, instead of allocating (and faulting in) them again: growing a 64-request
    # cache onto huge pages stalled every running request 1.5-2.2 s. 0 frees them at once; GPU
    # engines always keep theirs.
    kv_cache_keep_s: float = Field(300, ge=0)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_prompts: bool = True
    prompt_chars: int = Field(60, ge=0, le=10_000)
    format: Literal["text", "json"] = "text"
    events: int = Field(500, ge=10, le=100_000)


class RouterConfig(_Section):
    max_attempts: int = Field(3, ge=1, le=10)
    request_timeout_s: float = Field(600.0, gt=0)


class Config(_Section):
    namespace: str = "rayinfer"
    ports: RayPorts = Field(default_factory=RayPorts)
    head: HeadConfig = Field(default_factory=HeadConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


def interpolate(value: Any, env: dict[str, str] | None = None, where: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}} "
                          "for an optional one)")

    replaced = _VAR.sub(substitute, value)
    if _VAR.fullmatch(value):
        return _scalar(replaced)
    return replaced


def _scalar(text: str) -> Any:
    """Type a whole-value substitution the way a person means it: "" is unset, "2" is 2."""
    if text == "":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _key(loc: tuple) -> str:
    """An error's location as the key a user wrote (engine.pack_arrivals), without the union
    member pydantic appends when a value fits none of a field's types."""
    model: Any = Config
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif model is not None and part in model.model_fields:
            parts.append(part)
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(
                annotation, BaseModel) else None
        else:
            break
    return ".".join(parts)


def _describe(errors: list[dict[str, Any]]) -> str:
    """One clause per key and value: what is wrong with it, every type it could have been."""
    clauses: dict[tuple[str, str], list[str]] = {}
    for error in errors:
        if error["type"] == "extra_forbidden":
            where = ".".join(str(p) for p in error["loc"])
            clauses[(where, "")] = ["unknown key (check the spelling; see config/laptop.yaml "
                                    "for every key)"]
            continue
        value = error.get("input")
        shown = repr(value) if not isinstance(value, dict) else "a mapping"
        clauses.setdefault((_key(error["loc"]), shown), []).append(error["msg"])
    return "; ".join(f"{where}: {shown} is not allowed: {' or '.join(messages)}" if shown
                     else f"{where}: {messages[0]}"
                     for (where, shown), messages in clauses.items())


def from_dict(data: dict[str, Any] | None, env: dict[str, str] | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, not {type(data).__name__}")
    data = interpolate(data, env)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors())) from None


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Load a config file (or $RAYINFER_CONFIG, or the built-in defaults when neither is set)."""
    env_map = os.environ if env is None else env
    path = path or env_map.get(ENV_CONFIG)
    if not path:
        return from_dict({}, env)
    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {file} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {file} is not valid YAML{at}") from None
    try:
        return from_dict(data, env)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
