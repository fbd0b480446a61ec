"""A thin httpx client of the gateway (docs/api.md), and the one place that turns HTTP
outcomes into one-line errors with exit codes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from ray_inference import __version__
from ray_inference.cli.errors import (
    CANNOT_CONNECT,
    RATE_LIMITED,
    REJECTED,
    SERVER_ERROR,
    UNAVAILABLE,
    USAGE,
    CliError,
)
from ray_inference.cli.settings import ENV_API_KEY, ENV_URL

# Short connect timeout: a dead head must fail fast. Long read timeout: CPU generation is slow.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0
GENERATION_TIMEOUT_S = 600.0


@dataclass
class Answer:
    """A chat completion as the CLI shows it; `info` is the gateway's `rayinfer` extension."""

    text: str = ""
    id: str | None = None
    model: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    seconds: float = 0.0  # wall time as the client saw it

    @classmethod
    def from_body(cls, body: dict[str, Any], seconds: float) -> Answer:
        answer = cls(seconds=seconds)
        answer.absorb(body)
        for choice in body.get("choices") or []:
            answer.text += (choice.get("message") or {}).get("content") or ""
        return answer

    def absorb(self, body: dict[str, Any]) -> None:
        """Take the metadata of a response or of one streamed chunk."""
        self.id = body.get("id") or self.id
        self.model = body.get("model") or self.model
        if isinstance(body.get("rayinfer"), dict):
            self.info = body["rayinfer"]
        if body.get("usage"):
            self.usage = body["usage"]
        for choice in body.get("choices") or []:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason


class Client:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        url_source: str = "",
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
    ):
        self.url = url
        self.url_source = url_source
        self.api_key = api_key
        headers = {"User-Agent": f"rayinfer-cli/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._http = httpx.Client(
            base_url=url,
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- endpoints -------------------------------------------------------------------------

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        with self._transport_errors():
            response = self._http.get(path, params=params)
        self._check(response)
        return self._json(response)

    def model_ids(self) -> list[str]:
        body = self.get_json("/v1/models")
        return [m["id"] for m in body.get("data") or [] if isinstance(m, dict) and "id" in m]

    def served_models(self) -> list[str]:
        """The models served now; none yet is an error (no worker has registered)."""
        ids = self.model_ids()
        if not ids:
            raise CliError(
                f"{self.url} serves no model yet: no worker has registered. "
                "Check `rayinfer status`; a worker may still be loading its model.",
                UNAVAILABLE,
            )
        return ids

    def default_model(self) -> str:
        """The server's first model, so `ask` works without -m on a one-model cluster."""
        return self.served_models()[0]

    def require_model(self, model: str) -> None:
        """Fail unless the gateway serves `model` (before a load of requests for it)."""
        served = self.served_models()
        if model not in served:
            raise CliError(f"{self.url} does not serve model {model!r}; it serves: "
                           f"{', '.join(served)} (-m NAME)", REJECTED)

    def chat(self, body: dict[str, Any]) -> tuple[Answer, dict[str, Any]]:
        """One non-streamed completion: the Answer and the raw response body."""
        start = time.monotonic()
        with self._transport_errors():
            response = self._http.post(
                "/v1/chat/completions",
                json={**body, "stream": False},
                timeout=self._generation_timeout(),
            )
        self._check(response, model=body.get("model"))
        raw = self._json(response)
        return Answer.from_body(raw, time.monotonic() - start), raw

    @contextmanager
    def stream_chat(self, body: dict[str, Any]) -> Iterator[tuple[Iterator[str], Answer]]:
        """Yield (text pieces, answer); the answer fills in as the pieces are read.

        Leaving the `with` block early (Ctrl-C) closes the connection, which tells the gateway
        to stop generating.
        """
        answer = Answer()
        start = time.monotonic()
        # Errors raised while the caller iterates come back in at the yield, inside this block.
        with (
            self._transport_errors(),
            self._http.stream(
                "POST",
                "/v1/chat/completions",
                json={**body, "stream": True},
                timeout=self._generation_timeout(),
            ) as response,
        ):
            if response.status_code != 200:
                response.read()
                self._check(response, model=body.get("model"))
            yield self._sse_pieces(response, answer, start), answer

    # ---- internals -------------------------------------------------------------------------

    def _generation_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(max(self._read_timeout, GENERATION_TIMEOUT_S),
                             connect=self._connect_timeout)

    def _sse_pieces(self, response: httpx.Response, answer: Answer, start: float) -> Iterator[str]:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise CliError(f"{self.url} sent a malformed stream chunk: {data[:80]}") from None
            if "error" in chunk:
                raise self._error_from_body(None, chunk, None)
            answer.absorb(chunk)
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    answer.text += piece
                    answer.seconds = time.monotonic() - start
                    yield piece
        answer.seconds = time.monotonic() - start

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        where = f"{self.url} (from {self.url_source})" if self.url_source else self.url
        hint = f"Is the head running? Point --url or {ENV_URL} at the gateway."
        try:
            yield
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise CliError(f"invalid gateway URL {where}: {exc}", USAGE) from None
        except httpx.ConnectTimeout:
            raise CliError(
                f"cannot connect to {where}: no answer within {self._connect_timeout:g}s. {hint}",
                CANNOT_CONNECT,
            ) from None
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot connect to {where}: {_reason(exc)}. {hint}", CANNOT_CONNECT
            ) from None
        except httpx.TimeoutException:
            raise CliError(
                f"{where} accepted the connection but did not answer in time; "
                "the cluster may be overloaded (see `rayinfer status`).",
                CANNOT_CONNECT,
            ) from None
        except httpx.TransportError as exc:
            raise CliError(
                f"lost the connection to {where}: {_reason(exc)}", CANNOT_CONNECT
            ) from None

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise CliError(
                f"{self.url}{response.request.url.path} did not answer JSON; "
                "is that URL a rayinfer gateway?"
            ) from None

    def _check(self, response: httpx.Response, model: str | None = None) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        raise self._error_from_body(response, body, model)

    def _error_from_body(
        self, response: httpx.Response | None, body: Any, model: str | None
    ) -> CliError:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        status = response.status_code if response is not None else None
        text = response.text[:200] if response is not None else ""
        message = str(error.get("message") or text).strip()
        code = error.get("code")
        kind = error.get("type")
        detail = f": {message}" if message else ""

        if status in (401, 403) or code == "invalid_api_key":
            if self.api_key:
                todo = f"check {ENV_API_KEY} or --api-key"
            else:
                todo = f"set {ENV_API_KEY} or --api-key (or api_key in the client config)"
            return CliError(f"{self.url} refused the API key ({status}){detail}. {todo}",
                            REJECTED)
        if status == 404 or code == "model_not_found":
            if code == "model_not_found":
                return CliError(f"unknown model {model!r}{self._served_models()}", REJECTED)
            path = response.request.url.path if response is not None else ""
            return CliError(f"{self.url} has no {path} (404); is that URL a rayinfer gateway?",
                            REJECTED)
        if status == 429 or kind == "rate_limit_error":
            after = response.headers.get("Retry-After") if response is not None else None
            when = f"retry after {after}s" if after else "retry later"
            return CliError(f"the cluster is busy (429){detail}; {when}.", RATE_LIMITED)
        if status == 503 or kind == "service_unavailable":
            return CliError(
                f"no worker available{detail}. Check `rayinfer status`; "
                "a worker may still be loading its model.",
                UNAVAILABLE,
            )
        if (status is not None and 400 <= status < 500) or kind == "invalid_request_error":
            shown = f" ({status})" if status else ""
            return CliError(f"bad request{shown}{detail}", REJECTED)
        shown = f" ({status})" if status else ""
        return CliError(f"the gateway failed{shown}{detail}", SERVER_ERROR)

    def _served_models(self) -> str:
        try:
            ids = self.model_ids()
        except CliError:
            return "; see `rayinfer models`"
        return f"; served: {', '.join(ids)}" if ids else "; no model is served right now"


def _reason(exc: Exception) -> str:
    """'[Errno 111] Connection refused' -> 'connection refused'."""
    text = re.sub(r"\[Errno -?\d+\]\s*", "", str(exc)).strip() or type(exc).__name__
    return text[:1].lower() + text[1:]


def probe(url: str, timeout: float) -> tuple[bool, str, Any]:
    """GET url for a health check: (healthy, one-line reason, JSON body or None). Never raises."""
    try:
        # trust_env=False: a proxy from the environment must not sit between a node and itself.
        response = httpx.get(url, timeout=timeout, trust_env=False)
    except httpx.TimeoutException:
        return False, f"no answer within {timeout:g}s", None
    except httpx.HTTPError as exc:
        return False, _reason(exc), None
    try:
        body = response.json()
    except ValueError:
        body = None
    reason = (body.get("reason") or body.get("status")) if isinstance(body, dict) else None
    reason = reason or response.text.strip()[:80] or response.reason_phrase
    return response.status_code == 200, f"{response.status_code} {reason}", body
