"""OpenAI-shaped errors.

Every failure a client can see is one of these, so the router can turn it into
``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status, and a
stream can turn it into an SSE error event.
"""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """Base class: carries everything needed to render the OpenAI error envelope."""

    status_code: int = 500
    error_type: str = "internal_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequestError(OpenAIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(OpenAIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        listing = ", ".join(sorted(available)) or "none"
        super().__init__(
            f"The model '{model}' does not exist. Models served here: {listing}.",
            param="model",
        )


class AdapterNotFoundError(OpenAIError):
    """A ``<base>:<adapter>`` name the base model does not serve."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "adapter_not_found"

    def __init__(self, model: str, base: str, available: list[str]) -> None:
        listing = ", ".join(sorted(available)) or "none"
        super().__init__(
            f"The LoRA adapter '{model}' does not exist. Adapters of '{base}': {listing}.", param="model")


class ResponseNotFoundError(OpenAIError):
    """A stored response no serving model holds (vLLM's own shape for the same answer)."""

    status_code = 404
    error_type = "NotFoundError"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", code="response_not_found")


class OverloadedError(OpenAIError):
    """The model's replicas and queue are full: back off and retry (429, like OpenAI's rate limits)."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ModelUnavailableError(OpenAIError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "model_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ReplicaFailedError(ModelUnavailableError):
    """The replica running a request died, stalled or lost its engine: the router resumes the
    request on another replica (see rayllm_app.router.migration) until the model's
    migration_limit, then answers with this error."""

    default_code = "replica_failed"

    def __init__(self, message: str, *, reason: str = "replica_died") -> None:
        super().__init__(message)
        # A metric label: replica_died, channel_closed, engine_died, stalled; "rejected" (an
        # unhealthy replica refused the request before starting it), "not_resumable".
        self.reason = reason


class RequestTimeoutError(OpenAIError):
    status_code = 504
    error_type = "timeout"
    default_code = "request_timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"The request did not finish within {timeout_s:g} s and was cancelled; "
                         "ask for fewer tokens or raise the router's request_timeout_s.")


class EngineError(OpenAIError):
    status_code = 500
    error_type = "internal_error"
    default_code = "engine_error"


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
