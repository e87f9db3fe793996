"""Errors the router answers itself, in OpenAI's envelope, and its HTTP middleware.

FastAPI's own errors (a bad path or query parameter, an unknown route) are turned into the
same shape as the OpenAI errors the router raises; request bodies are vLLM's to validate.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.errors import InvalidRequestError, OpenAIError, error_body
from rayllm_app.observability.metrics import record_router_request
from rayllm_app.router.middleware import BodySizeLimitMiddleware, RequestIdMiddleware


def error_response(error: OpenAIError, model: str | None = None) -> JSONResponse:
    """An error the router itself answers (the replicas count their own)."""
    record_router_request(model, error.status_code)
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """The router's own parameters (paths, queries); request bodies are vLLM's to validate."""
    first = (list(exc.errors()) or [{}])[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    return error_response(InvalidRequestError(f"Invalid value for '{param}': {first.get('msg', 'invalid value')}",
                                              param=param))


async def _on_openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return error_response(exc)


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def install_error_handlers(target: FastAPI) -> None:
    target.add_exception_handler(RequestValidationError, _on_validation_error)
    target.add_exception_handler(OpenAIError, _on_openai_error)
    target.add_exception_handler(StarletteHTTPException, _on_http_error)


def install_middleware(target: FastAPI, settings: RouterSettings) -> None:
    """Request ids and access logs, body limits, and CORS when origins are configured."""
    if getattr(target.state, "rayllm_middleware", False):
        return
    target.state.rayllm_middleware = True
    target.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.cors_allow_origins:
        target.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Api-Key", "Anthropic-Version"],
            expose_headers=["X-Request-Id", "Retry-After", "X-Rayllm-Router"], max_age=600)
    target.add_middleware(RequestIdMiddleware)
