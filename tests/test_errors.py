"""Unit tests for the OpenAI error envelope (rayllm_app.errors) and the router's
description of request validation errors."""

from __future__ import annotations


import pytest

from rayllm_app.errors import (
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    OpenAIError,
    OverloadedError,
    error_body,
)
from rayllm_app.router.protocol import ErrorResponse, peek_body

ENVELOPE_KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code"),
    [
        (InvalidRequestError("bad"), 400, "invalid_request_error", None),
        (ModelNotFoundError("x", ["a"]), 404, "invalid_request_error", "model_not_found"),
        (OverloadedError("busy"), 429, "rate_limit_error", "overloaded"),
        (ModelUnavailableError("down"), 503, "service_unavailable", "model_unavailable"),
        (EngineError("boom"), 500, "internal_error", "engine_error"),
        (OpenAIError("generic"), 500, "internal_error", None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_status_type_code_and_envelope(error: OpenAIError, status: int, error_type: str, code: str | None):
    assert error.status_code == status
    body = error.to_dict()
    assert set(body) == {"error"}
    assert set(body["error"]) == ENVELOPE_KEYS
    assert body["error"]["type"] == error_type
    assert body["error"]["code"] == code
    assert body["error"]["message"] == str(error)
    ErrorResponse.model_validate(body)  # the documented response schema accepts it


def test_explicit_code_and_param_override_defaults():
    error = InvalidRequestError("x", param="max_tokens", code="custom")
    assert error.to_dict()["error"] == {"message": "x", "type": "invalid_request_error", "param": "max_tokens",
                                        "code": "custom"}


def test_overloaded_and_unavailable_carry_retry_after():
    assert OverloadedError("busy").headers == {"Retry-After": "1"}
    assert ModelUnavailableError("down").headers == {"Retry-After": "5"}
    assert InvalidRequestError("bad").headers == {}


def test_model_not_found_lists_available_models_sorted():
    error = ModelNotFoundError("gpt-4", ["zeta", "alpha"])
    assert error.param == "model"
    assert "'gpt-4'" in error.message
    assert "alpha, zeta" in error.message
    assert "none" in ModelNotFoundError("gpt-4", []).message


def test_error_body_shape():
    assert error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}


# ---------------------------------------------------------------- protocol.peek_body


@pytest.mark.parametrize(("raw", "message", "param"), [
    (b"", "must be a JSON object", None),
    (b"{not json", "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object", None),
    (b'{"messages": []}', "Missing required parameter: 'model'", "model"),
    (b'{"model": 3}', "'model' must be a non-empty string", "model"),
    (b'{"model": ""}', "'model' must be a non-empty string", "model"),
])
def test_unroutable_bodies_are_400s_that_say_why(raw, message, param):
    with pytest.raises(InvalidRequestError) as info:
        peek_body(raw)
    assert message in info.value.message
    assert info.value.param == param and info.value.status_code == 400


def test_peek_reads_only_what_routing_needs():
    peek = peek_body(b'{"model": "m", "stream": true, "n": 3, "messages": [{"role": "user", "content": "x"}]}')
    assert (peek.model, peek.stream, peek.n) == ("m", True, 3)
    assert peek_body(b'{"model": "m", "stream": "yes"}').stream is False  # vLLM judges the type
