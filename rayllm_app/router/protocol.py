"""What the router itself reads and writes of the OpenAI API.

Request and response bodies belong to vLLM's OpenAI layer, which every model replica
runs; the router reads only what routing needs (:func:`peek_body`: ``model``, ``stream``,
``n``) and forwards the bytes. It answers ``/v1/models`` and errors itself, with the
models below (they also make its OpenAPI schema).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from rayllm_app.errors import InvalidRequestError

# Forwarded POST endpoints, and the capability a model card must list to serve each.
ENDPOINT_CAPABILITIES: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "messages",
    "/v1/embeddings": "embeddings",
    "/v1/score": "score",
    "/v1/rerank": "score",
    "/tokenize": "tokenize",
    "/detokenize": "tokenize",
}


@dataclass(frozen=True, slots=True)
class BodyPeek:
    """The few fields of a request body the router needs."""

    model: str
    stream: bool
    n: Any
    data: dict[str, Any]


def peek_body(raw: bytes) -> BodyPeek:
    """Parse a forwarded body just enough to route it; a clear 400 when it cannot be routed."""
    try:
        data = json.loads(raw) if raw else None
    except ValueError as error:
        raise InvalidRequestError(f"The request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object with a 'model' field.")
    model = data.get("model")
    if model is None:
        raise InvalidRequestError("Missing required parameter: 'model'. Name one of the models "
                                  "GET /v1/models lists.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string.", param="model")
    return BodyPeek(model, data.get("stream") is True, data.get("n"), data)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rayllm-app"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The schema of a forwarded request body as the router's OpenAPI document shows it: the
# fields it routes by; everything else is vLLM's (see its /docs for the full schemas).
FORWARDED_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
    "additionalProperties": True,
}
