"""Where the CLI connects and with which key.

Each setting comes from the first of: the command-line flag, the environment, the client
config file the deployment writes, the default. The source is kept so that errors and
`rayinfer config` can say why the CLI talks to that URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ray_inference.cli.errors import USAGE, CliError

DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "RAYINFER_URL"
ENV_API_KEY = "RAYINFER_API_KEY"
ENV_CLIENT_CONFIG = "RAYINFER_CLIENT_CONFIG"
FILE_KEYS = ("url", "api_key")


@dataclass(frozen=True)
class Setting:
    value: str | None
    source: str  # "--url", "RAYINFER_URL", the file's path, "default" or "not set"


@dataclass(frozen=True)
class Connection:
    url: Setting
    api_key: Setting
    config_file: Path
    config_file_found: bool


def client_config_path() -> Path:
    explicit = os.environ.get(ENV_CLIENT_CONFIG)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "rayinfer" / "client.yaml"


def read_client_config(path: Path) -> dict[str, str]:
    """The file's settings; {} when the default file is absent. Any other problem is an error."""
    if not path.is_file():
        if os.environ.get(ENV_CLIENT_CONFIG):
            raise CliError(f"client config {path} (from {ENV_CLIENT_CONFIG}) not found", USAGE)
        return {}
    import yaml  # only when there is a file to read

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0]
        raise CliError(f"cannot read client config {path}: {reason}", USAGE) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"client config {path} must be a mapping with keys url, api_key", USAGE)
    unknown = sorted(str(k) for k in data if k not in FILE_KEYS)
    if unknown:
        raise CliError(
            f"client config {path}: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(FILE_KEYS)}",
            USAGE,
        )
    settings = {}
    for key, value in data.items():
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise CliError(f"client config {path}: {key} must be a string", USAGE)
        settings[key] = value
    return settings


def normalize_url(url: str) -> str:
    """Accept `host:port` and OpenAI-style base URLs ending in /v1; return scheme://host:port."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def resolve(url_flag: str | None = None, api_key_flag: str | None = None) -> Connection:
    path = client_config_path()
    url_env = os.environ.get(ENV_URL) or None
    key_env = os.environ.get(ENV_API_KEY) or None
    needs_file = (url_flag or url_env) is None or (api_key_flag or key_env) is None
    from_file = read_client_config(path) if needs_file else {}

    url = _first(("--url", url_flag), (ENV_URL, url_env), (str(path), from_file.get("url")))
    if url is None:
        url = Setting(DEFAULT_URL, "default")
    url = Setting(normalize_url(url.value), url.source)
    api_key = _first(
        ("--api-key", api_key_flag),
        (ENV_API_KEY, key_env),
        (str(path), from_file.get("api_key")),
    ) or Setting(None, "not set")
    return Connection(url, api_key, path, path.is_file())


def _first(*candidates: tuple[str, str | None]) -> Setting | None:
    for source, value in candidates:
        if value:
            return Setting(value, source)
    return None


def mask(secret: str | None) -> str | None:
    """Enough of a key to tell two apart, never enough to use it."""
    if not secret:
        return None
    return "****" + secret[-4:] if len(secret) >= 12 else "****"
