"""A client's HTTP request as the router forwards it, and the replica's reply to it.

The router reads only what it must from a request (``model``, ``stream``) and forwards
the rest untouched: method, path, query, the headers that matter and the body bytes.
The replica runs it through vLLM's own OpenAI application, called in-process as ASGI
(:func:`call_asgi`), and answers with a :class:`Reply` (status, headers, the whole body
or, for an event stream, its first bytes) followed, for streams, by more bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from rayllm_app.observability import hop_trace
from rayllm_app.replica.resume import TOKENS_KEY

# Request headers the replica's application may need; authentication, cookies and hop
# headers stay with the router.
FORWARDED_HEADERS = ("content-type", "accept", "anthropic-version", "anthropic-beta")
# How long an application may take to wind up after a disconnect before it is cancelled.
DISCONNECT_GRACE_S = 2.0
# Response headers the router sets itself.
_DROPPED_REPLY_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server"}
# The last event of each streamed API vLLM serves (OpenAI chat/completions, Anthropic
# Messages, Responses): after one of them the answer is whole, and only its usage is to come.
_LAST_EVENTS = (b"data: [DONE]", b"event: message_stop", b"event: response.completed",
                b"event: response.incomplete", b"event: response.failed")
# How long a whole answer's usage may take to follow it, when its client has already left.
END_GRACE_S = 5.0


def answer_finished(chunk: bytes) -> bool:
    """Whether these bytes, the last sent, end with the answer's last event."""
    tail = chunk[-400:]
    return any(marker in tail for marker in _LAST_EVENTS)


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    method: str
    path: str
    body: bytes = b""
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    # Read by the model's request router, not by the replica: the request's session or prompt
    # prefix keys (rayllm_app.router.affinity); () for power-of-two routing.
    affinity: tuple[int, ...] = ()


@dataclass(slots=True)
class Usage:
    """The tokens the engine prefilled and generated for one request, as it counted them
    (see rayllm_app.replica.usage_meter): what the router charges to the caller's budget."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Reply:
    """The head of a replica's answer: status, headers, and the body (or a stream's first
    bytes); a whole answer also carries its usage."""

    status_code: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    usage: Usage | None = None
    # A tracked stream (rayllm_app.replica.resume): the token ids the body's text stands for;
    # None when the stream is not tracked (it cannot be resumed elsewhere).
    tokens: tuple[int, ...] | None = None

    @property
    def is_stream(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")


Sink = Callable[[bytes, "list[int] | None"], None]  # a stream's bytes, and the token ids they carry


async def call_asgi(app: Any, request: ForwardedRequest, sink: Sink | None = None) -> AsyncIterator[Reply | bytes]:
    """Run one request through an ASGI application in this process.

    Yields one :class:`Reply`, then, when the answer is an event stream, its further bytes
    as the application writes them. A plain answer arrives whole in the Reply; a stream's
    Reply holds its first bytes, so a failure before any output keeps its HTTP status.

    With a ``sink``, a stream's further bytes go to it straight from the application's
    ``send`` (no queue, no task switch per token: the replica's hot path), with the token ids
    a tracked stream attached to them (rayllm_app.replica.resume), and the generator yields
    only the Reply, returning when the stream ends.

    Closing the generator (the client went away, the call was cancelled) reports a
    disconnect to the application, which aborts the engine request, and cancels what is left
    of it after a short grace.
    """
    messages: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False
    direct: Sink | None = None  # the sink, once the Reply has gone out

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    def deliver(message: dict[str, Any]) -> None:
        if direct is not None and message["type"] == "http.response.body":
            if chunk := message.get("body", b""):
                direct(chunk, message.get(TOKENS_KEY))
            if not message.get("more_body", False):
                messages.put_nowait(None)
            return
        messages.put_nowait(message)

    async def send(message: dict[str, Any]) -> None:
        deliver(message)

    send.deliver = deliver  # type: ignore[attr-defined]  # synchronous, for rayllm_app.replica.resume

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        except BaseException as error:  # noqa: BLE001 - surfaced to the reader below
            messages.put_nowait(error)
            raise
        messages.put_nowait(None)

    hop_trace.mark("replica.app")
    task = asyncio.ensure_future(run())
    try:
        start = await _next(messages)
        if start is None or start.get("type") != "http.response.start":
            raise RuntimeError("the application ended without a response")
        headers = {}
        for name, value in start.get("headers") or ():
            key = name.decode("latin-1").lower()
            if key not in _DROPPED_REPLY_HEADERS:
                headers[key] = value.decode("latin-1")
        head = Reply(start["status"], b"", headers)
        stream = head.is_stream and head.status_code == 200
        body = bytearray()
        tokens: list[int] = []
        more = True
        while more:
            chunk, more, ids = await _body(messages)
            body += chunk
            tokens += ids or ()
            if stream and body:
                break
        hop_trace.mark("replica.reply")
        yield Reply(head.status_code, bytes(body), headers, tokens=tuple(tokens) if tokens else None)
        if more and sink is not None:
            while more and not messages.empty():  # what came meanwhile goes first, in order
                chunk, more, ids = await _body(messages)
                if chunk:
                    sink(chunk, ids)
            direct = sink
        while more:
            chunk, more, _ = await _body(messages)
            if chunk:
                yield chunk
    finally:
        # Tell the application first, as a server tells it a client hung up: vLLM's handlers
        # watch for the disconnect and cancel their own work (a plain cancel of the outer task
        # would leave vLLM's inner handler task, and its engine request, running).
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _body(messages: asyncio.Queue) -> tuple[bytes, bool, list[int] | None]:
    """The next body bytes, whether more follow, and the token ids they carry; (b"", False,
    None) at the application's end."""
    while True:
        message = await _next(messages)
        if message is None:
            return b"", False, None
        if message.get("type") == "http.response.body":
            return message.get("body", b""), bool(message.get("more_body", False)), message.get(TOKENS_KEY)


async def _next(messages: asyncio.Queue) -> dict[str, Any] | None:
    message = await messages.get()
    if isinstance(message, BaseException):
        raise message
    return message


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http",
        # 2.3: Starlette's streaming responses watch receive() for the disconnect.
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query.encode("latin-1"),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
