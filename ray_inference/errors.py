"""Errors that cross layers (engine -> actor -> router -> gateway/CLI).

Each carries the HTTP status and OpenAI error type the gateway answers with, so a layer raises
what happened and only the gateway decides how it looks on the wire. They are plain exceptions,
so Ray re-raises them at the caller as instances of the same class.
"""

from __future__ import annotations


class RayInferError(Exception):
    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        return (type(self), (self.message, self.param))


class InvalidRequest(RayInferError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(RayInferError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(RayInferError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class Overloaded(RayInferError):
    """A bounded queue is full; the client should retry after retry_after seconds."""

    status = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, param: str | None = None, retry_after: float = 1.0):
        super().__init__(message, param)
        self.retry_after = retry_after

    def __reduce__(self):
        return (type(self), (self.message, self.param, self.retry_after))


class NoWorkerAvailable(RayInferError):
    status = 503
    error_type = "service_unavailable"
    code = "no_worker"


class ModelLoadError(RayInferError):
    """A model could not be found or loaded; the message says where to put the files."""


def unwrap(exc: BaseException) -> BaseException:
    """The error an actor raised, without Ray's RayTaskError wrapper (and its traceback text)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RayInferError) else exc
