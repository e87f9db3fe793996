"""Unit tests for the OpenAI error envelope (rayllm_app.errors) and the router's
description of request validation errors."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rayllm_app.errors import (
    ContextLengthExceededError,
    EngineError,
    ErrorReply,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    OpenAIError,
    OverloadedError,
    UnsupportedParameterError,
    error_body,
)
from rayllm_app.protocol import ChatCompletionRequest, ErrorResponse

ENVELOPE_KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code"),
    [
        (InvalidRequestError("bad"), 400, "invalid_request_error", None),
        (UnsupportedParameterError("bad"), 400, "invalid_request_error", "unsupported_parameter"),
        (ContextLengthExceededError("long"), 400, "invalid_request_error", "context_length_exceeded"),
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
    error = ContextLengthExceededError("x", param="max_tokens", code="custom")
    assert error.to_dict()["error"] == {"message": "x", "type": "invalid_request_error", "param": "max_tokens",
                                        "code": "custom"}


def test_to_wire_carries_status_body_and_headers():
    reply = OverloadedError("busy", retry_after_s=7).to_wire()
    assert isinstance(reply, ErrorReply)
    assert reply.status_code == 429
    assert reply.headers == {"Retry-After": "7"}
    assert json.loads(reply.body) == {"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                                "code": "overloaded"}}


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


# ---------------------------------------------------------------- router._describe_validation_error


@pytest.fixture(scope="module")
def describe():
    from rayllm_app.router import _describe_validation_error

    return _describe_validation_error


def body_errors(payload: dict) -> list[dict]:
    """Errors as FastAPI reports them for a JSON body: pydantic's, with 'body' prepended to loc."""
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(payload)
    return [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]


def test_describe_json_invalid(describe):
    errors = [{"type": "json_invalid", "loc": ("body", 12), "msg": "JSON decode error", "input": {},
               "ctx": {"error": "Expecting value"}}]
    message, param = describe(errors)
    assert message.startswith("The request body is not valid JSON")
    assert "JSON decode error" in message
    assert param is None


def test_describe_extra_forbidden(describe):
    message, param = describe(body_errors({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                           "functions": []}))
    assert param == "functions"
    assert message == "Unsupported parameter: 'functions' is not supported by this server."


def test_describe_nested_extra_forbidden(describe):
    message, param = describe(body_errors({"model": "m", "messages": [{"role": "user", "content": "x", "x": 1}]}))
    assert param == "messages.0.x"
    assert "Unsupported parameter: 'messages.0.x'" in message


def test_describe_missing(describe):
    message, param = describe(body_errors({"messages": [{"role": "user", "content": "x"}]}))
    assert param == "model"
    assert message == "Missing required parameter: 'model'."


def test_describe_other_value_error(describe):
    message, param = describe(body_errors({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                           "temperature": 3}))
    assert param == "temperature"
    assert message.startswith("Invalid value for 'temperature': ")
    assert "2" in message


def test_describe_error_without_location(describe):
    message, param = describe([{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be an object"}])
    assert param is None
    assert message == "Input should be an object"
