"""A channelled stream's END frame carries the request's usage, which the router charges. A
client that leaves at the answer's last event (the OpenAI SDK closes at ``data: [DONE]``)
makes Ray Serve cancel the replica's call while the END frame may still be unsent: the
replica must still send it, with the usage. A client that leaves mid-answer aborts the
engine request at once (the router charges the reservation then)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rayllm_app.config import GenerationConfig
from rayllm_app.observability.metrics import ModelMetrics
from rayllm_app.replica.deployment import ModelServer
from rayllm_app.replica.http_forward import ForwardedRequest, Reply, Usage
from rayllm_app.replica.request_defaults import RequestDefaults
from rayllm_app.replica.stream_channel import ChannelRequest, Ticket
from rayllm_app.replica.usage_meter import REQUEST_USAGE

SSE = {"content-type": "text/event-stream"}
REQUEST = ForwardedRequest("POST", "/v1/chat/completions", b'{"model": "m", "stream": true}')


class NullMetric:
    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    def observe(self, *args: Any, **kwargs: Any) -> None:
        pass


class ChannelServer:
    """The replica's channel server, as far as a stream uses it: frames sent, END frames."""

    ticket = Ticket("127.0.0.1", 1)

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.ends: list[Usage | None] = []

    def send(self, request: ChannelRequest, item: Any, tokens: Any = None) -> None:
        self.frames.append(item)

    def end(self, request: ChannelRequest, usage: Usage | None = None) -> None:
        self.ends.append(usage)


class Engine:
    """vLLM's application for one streamed request: the Reply, then chunks straight to the
    sink, then a wind-up (its handler returning) that ends when ``wound_up`` is set."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.wound_up = asyncio.Event()
        self.closed = False

    def shutdown(self) -> None:
        pass

    async def handle(self, request: Any, sink: Any = None, wrap: Any = None):
        usage = REQUEST_USAGE.get()
        usage.prompt_tokens, usage.completion_tokens = 9, len(self.chunks)  # as the metered engine counts
        try:
            yield Reply(200, b"data: {}\n\n", SSE)
            for chunk in self.chunks:
                sink(chunk, None)
            await self.wound_up.wait()
        finally:
            self.closed = True


def model_server(engine: Engine, channel: ChannelServer) -> ModelServer:
    server = ModelServer.__new__(ModelServer)  # no engine start: only the serving path
    server.engine = engine
    server.defaults = RequestDefaults(GenerationConfig())
    server.metrics = ModelMetrics("m", metric=lambda name: NullMetric())
    server._pumps, server._failed_pumps = set(), set()

    async def channel_server() -> ChannelServer:
        return channel

    server._channel_server = channel_server
    return server


@pytest.mark.parametrize("whole", [True, False])
def test_a_call_cancelled_after_the_last_event_still_sends_the_usage(whole: bool):
    async def main() -> None:
        last = b"data: [DONE]\n\n" if whole else b'data: {"b": 2}\n\n'
        engine, channel = Engine([b'data: {"a": 1}\n\n', last]), ChannelServer()
        call = model_server(engine, channel).forward_stream(REQUEST, ChannelRequest(b"r", 1))
        assert isinstance(await call.__anext__(), Ticket)
        waiting = asyncio.ensure_future(call.__anext__())
        for _ in range(100):
            if last in channel.frames:
                break
            await asyncio.sleep(0.01)
        assert channel.frames[-1] == last
        waiting.cancel()  # the client left: Ray Serve cancels the call
        await asyncio.sleep(0.05)
        if not whole:  # mid-answer: the engine request is aborted now, and no usage is sent
            assert engine.closed and channel.ends == []
            return
        assert not engine.closed and channel.ends == []  # vLLM's handler is still winding up
        engine.wound_up.set()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert channel.ends == [Usage(9, 2)] and engine.closed

    asyncio.run(asyncio.wait_for(main(), 20))
