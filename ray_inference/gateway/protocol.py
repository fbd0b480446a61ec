"""OpenAI's wire format: typed requests (validated here) and the responses we build."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Request(BaseModel):
    # Unknown fields are ignored as OpenAI does; known ones are type-checked strictly.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    user: str | None = None
    # Extension (as in vLLM): generate max_tokens even past end-of-sequence; for benchmarks.
    ignore_eos: bool = False

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("must be at least 1")
        return value

    @field_validator("n")
    @classmethod
    def _single(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "stop": self.stop, "ignore_eos": self.ignore_eos}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _has_text(self) -> ChatCompletionRequest:
        if not any(m.text().strip() for m in self.messages):
            raise ValueError("messages: every message is empty")
        return self

    def engine_request(self) -> dict[str, Any]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in self.messages]
        return {"messages": messages, **self.sampling()}


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt is supported per request")
            value = value[0]
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value

    def engine_request(self) -> dict[str, Any]:
        return {"prompt": self.prompt, **self.sampling()}


def served_by(chunk: dict[str, Any]) -> dict[str, Any]:
    """The `rayinfer` extension field: who answered and how long it took."""
    route = chunk.get("route", {})
    return {"node_label": route.get("node_label"), "hostname": route.get("hostname"),
            "ip": route.get("ip"), "node_id": route.get("node_id"),
            "actor_id": route.get("actor_id"), "model": route.get("model"),
            "device": route.get("device"), "queue_s": round(chunk.get("queue_s", 0.0), 4),
            "generation_s": round(chunk.get("generation_s", 0.0), 4),
            "batch_size": chunk.get("batch_size"), "retries": chunk.get("retries", 0)}


def usage(chunk: dict[str, Any]) -> dict[str, int]:
    prompt, completion = chunk.get("prompt_tokens", 0), chunk.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def finish_reason(chunk: dict[str, Any]) -> str | None:
    reason = chunk.get("finish_reason")
    return reason if reason in ("stop", "length") else None


class ResponseBuilder:
    """Builds OpenAI-shaped bodies for one request (chat or text completion)."""

    def __init__(self, kind: Literal["chat", "text"], request_id: str, model: str):
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}

    def complete(self, result: dict[str, Any]) -> dict[str, Any]:
        reason = finish_reason(result)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                      "finish_reason": reason, "logprobs": None}
            body = self._envelope("chat.completion", choice)
        else:
            body = self._envelope("text_completion", {"index": 0, "text": result["text"],
                                                      "finish_reason": reason,
                                                      "logprobs": None})
        body["usage"] = usage(result)
        body["rayinfer"] = served_by(result)
        return body

    def chunk(self, chunk: dict[str, Any], first: bool) -> dict[str, Any]:
        reason = finish_reason(chunk) if chunk.get("finish_reason") else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": chunk["text"]}
            if first:
                delta["role"] = "assistant"
            body = self._envelope("chat.completion.chunk",
                                  {"index": 0, "delta": delta, "finish_reason": reason,
                                   "logprobs": None})
        else:
            body = self._envelope("text_completion", {"index": 0, "text": chunk["text"],
                                                      "finish_reason": reason,
                                                      "logprobs": None})
        if chunk.get("finish_reason"):
            body["usage"] = usage(chunk)
            body["rayinfer"] = served_by(chunk)
        return body


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
