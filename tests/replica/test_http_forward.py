"""The replica's in-process ASGI call (http_forward.call_asgi) and the request defaults the
replica applies to forwarded bodies (request_defaults), without Ray or vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rayllm_app.config import GenerationConfig
from rayllm_app.replica.http_forward import ForwardedRequest, Reply, call_asgi
from rayllm_app.replica.request_defaults import RequestDefaults, merged_stop
from tests.conftest import drain

app = FastAPI()
events: list[str] = []


@app.post("/echo")
async def echo(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"got": body, "query": request.url.query, "type": request.headers.get("content-type")},
                        status_code=201)


@app.post("/bad")
async def bad() -> JSONResponse:
    return JSONResponse({"error": {"message": "no"}}, status_code=400)


@app.post("/stream")
async def stream(request: Request) -> StreamingResponse:
    count = (await request.json())["count"]

    async def frames():
        try:
            for i in range(count):
                await asyncio.sleep(0.01)
                yield f"data: {i}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    return StreamingResponse(frames(), media_type="text/event-stream")


def collect(request: ForwardedRequest, limit: int | None = None) -> list:
    return drain(call_asgi(app, request), limit)


def test_a_plain_answer_arrives_whole_with_status_and_headers():
    items = collect(ForwardedRequest("POST", "/echo", b'{"a": 1}', "x=2", (("content-type", "application/json"),)))
    assert len(items) == 1 and isinstance(items[0], Reply)
    reply = items[0]
    assert reply.status_code == 201 and not reply.is_stream
    assert json.loads(reply.body) == {"got": {"a": 1}, "query": "x=2", "type": "application/json"}
    assert reply.headers["content-type"] == "application/json"
    assert "content-length" not in reply.headers  # the router's response sets its own


def test_an_error_keeps_its_status():
    (reply,) = collect(ForwardedRequest("POST", "/bad", b"{}"))
    assert reply.status_code == 400 and json.loads(reply.body) == {"error": {"message": "no"}}


def test_unknown_paths_are_the_apps_404():
    (reply,) = collect(ForwardedRequest("POST", "/nowhere", b"{}"))
    assert reply.status_code == 404


def test_a_stream_starts_with_its_first_bytes_then_follows():
    items = collect(ForwardedRequest("POST", "/stream", b'{"count": 3}'))
    assert isinstance(items[0], Reply) and items[0].is_stream and items[0].body == b"data: 0\n\n"
    assert b"".join(items[1:]) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


def test_closing_the_stream_cancels_the_application():
    events.clear()
    items = collect(ForwardedRequest("POST", "/stream", b'{"count": 1000}'), limit=2)
    assert len(items) == 2
    assert events == ["cancelled"]


def test_an_application_that_fails_raises_to_the_reader():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    async def run():
        async for _ in call_asgi(broken, ForwardedRequest("POST", "/x")):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run())


# ------------------------------------------------------------------ request defaults


def test_stopping_sequences_join_the_requests_stop():
    assert merged_stop(None, None, ["</s>"]) == ["</s>"]
    assert merged_stop("x", ["d"], ["</s>"]) == ["x", "</s>"]
    assert merged_stop(None, ["d"], ["</s>", "d"]) == ["d", "</s>"]
    assert merged_stop(5, None, ["</s>"]) == 5  # a wrong type is left for vLLM to reject


def test_defaults_fill_what_the_request_leaves_unset():
    defaults = RequestDefaults(GenerationConfig(
        generate_kwargs={"seed": 7, "ignore_eos": True, "stop": ["END"]}, stopping_sequences=["</s>"]))
    body = json.loads(defaults.apply("/v1/chat/completions", b'{"model": "m", "seed": 1, "stop": null}'))
    assert body == {"model": "m", "seed": 1, "ignore_eos": True, "stop": ["END", "</s>"]}
    body = json.loads(defaults.apply("/v1/completions", b'{"model": "m", "stop": "x"}'))
    assert body["stop"] == ["x", "</s>"] and body["seed"] == 7
    assert defaults.apply("/tokenize", b'{"model": "m"}') == b'{"model": "m"}'
    assert defaults.apply("/v1/completions", b"not json") == b"not json"


def test_models_without_defaults_pass_bodies_through_untouched():
    defaults = RequestDefaults(GenerationConfig(generate_kwargs={"temperature": 0.2}))
    assert not defaults.active  # temperature is vLLM's: override_generation_config
    raw = b'{"model":"m",  "messages": []}'
    assert defaults.apply("/v1/chat/completions", raw) is raw


def test_a_disconnect_reaches_handlers_that_run_their_work_in_a_task():
    """vLLM's handlers run in an inner task and watch receive() for the disconnect (its
    with_cancellation); cancelling only the outer call would leave that task running."""
    seen: list[str] = []

    async def app(scope, receive, send):
        await receive()  # the body
        inner = asyncio.ensure_future(asyncio.sleep(30))
        watcher = asyncio.ensure_future(receive())
        try:
            done, _ = await asyncio.wait({inner, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher.done() and watcher.result()["type"] == "http.disconnect":
                inner.cancel()
                seen.append("inner cancelled")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def run():
        call = asyncio.ensure_future(collect_async(app))
        await asyncio.sleep(0.1)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)

    async def collect_async(application):
        async with contextlib.aclosing(call_asgi(application, ForwardedRequest("POST", "/x"))) as items:
            async for _ in items:
                pass

    asyncio.run(asyncio.wait_for(run(), 10))
    assert seen == ["inner cancelled"]


def test_a_sink_takes_a_streams_bytes_straight_from_the_application():
    """The replica's channel path: after the Reply, chunks go to the sink from the app's own
    send (in order, none lost), and the generator yields nothing more."""
    received: list[bytes] = []

    async def run() -> list:
        items = []
        async with contextlib.aclosing(call_asgi(app, ForwardedRequest("POST", "/stream", b'{"count": 5}'),
                                                 sink=lambda chunk, tokens: received.append(chunk))) as generator:
            async for item in generator:
                items.append(item)
        return items

    items = asyncio.run(asyncio.wait_for(run(), 10))
    assert len(items) == 1 and isinstance(items[0], Reply) and items[0].body == b"data: 0\n\n"
    assert b"".join(received) == b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\ndata: [DONE]\n\n"


def test_a_sink_leaves_plain_answers_whole():
    received: list[bytes] = []

    async def run() -> list:
        return [item async for item in call_asgi(app, ForwardedRequest("POST", "/bad", b"{}"), sink=lambda chunk, tokens: received.append(chunk))]

    (reply,) = asyncio.run(run())
    assert reply.status_code == 400 and received == []
