"""What goes into an engine and what comes out of it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]
# The values of engine.quantize and engine.kv_cache_dtype (config.py, and the CLI's choices).
Quantize = Literal["none", "int8"]
KvCacheDtype = Literal["auto", "bfloat16", "float16"]


@dataclass
class GenerationRequest:
    """One prompt with its own sampling settings; `messages` wins over `prompt`."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Keep going past end-of-sequence (benchmarks: every variant makes the same token count).
    ignore_eos: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Tokens already sent to the client by an actor that died: generation resumes after them.
    resume_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)


@dataclass
class Chunk:
    """A piece of one request's output; the last one has finish_reason set."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    generation_s: float = 0.0
    batch_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
