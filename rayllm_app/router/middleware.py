"""ASGI middleware for the router: structured access logs with request ids, body size limits.

Pure ASGI (no BaseHTTPMiddleware) so streamed responses pass through untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from rayllm_app.errors import error_body
from rayllm_app.observability import hop_trace

access_log = logging.getLogger("rayllm.access")
request_id_var: ContextVar[str] = ContextVar("rayllm_request_id", default="")
request_model_var: ContextVar[str | None] = ContextVar("rayllm_request_model", default=None)

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def set_request_model(model: str) -> None:
    """Let the access log name the model (called by the route that knows it)."""
    request_model_var.set(model)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def current_request_id(scope: dict[str, Any]) -> str:
    """Ray Serve's id for this request (its proxy takes X-Request-Id from the client or makes
    one, and returns it as the X-Request-Id response header), so our logs and Serve's agree."""
    try:
        from ray.serve.context import _get_serve_request_context

        serve_id = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside Serve (plain ASGI): fall back to our own
        serve_id = ""
    if serve_id:
        return serve_id
    incoming = _header(scope, b"x-request-id")
    return incoming if incoming and _SAFE_ID.match(incoming) else uuid.uuid4().hex


def _router_id() -> bytes:
    """This router replica's id (Serve's replica id), or the process id outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id.encode()
    except Exception:  # noqa: BLE001 - plain ASGI (unit tests)
        return str(os.getpid()).encode()


class RequestIdMiddleware:
    """One structured (JSON) access-log line per request, carrying the request id, and an
    ``X-Rayllm-Router`` response header naming the router replica that answered (there may be
    many behind one port: which one holds a stream tells where to look, and what a router's
    restart cut)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._router: tuple[bytes, bytes] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hop_trace.mark("router.app")
        request_id = current_request_id(scope)
        request_id_var.set(request_id)
        request_model_var.set(None)
        started = time.perf_counter()
        status = 500

        router = self._router
        if router is None:
            router = self._router = (b"x-rayllm-router", _router_id())

        async def send_with_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), router]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            if scope.get("path") not in ("/health", "/metrics"):
                access_log.info(json.dumps({
                    "event": "request", "request_id": request_id, "method": scope.get("method"),
                    "path": scope.get("path"), "status": status, "model": request_model_var.get(),
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                }))


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or while a chunked body streams in."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps(error_body(
            f"Request body too large: the limit is {self.max_bytes} bytes.", "invalid_request_error",
            None, "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        too_large = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._reject(send)


class _BodyTooLarge(Exception):
    pass
