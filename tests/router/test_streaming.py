"""The router's stream relay settles a request with the replica's token count even when the
client leaves right after the answer's last event (as the OpenAI SDK does at ``[DONE]``),
and charges the reservation (usage None, 499) when it leaves mid-answer."""

from __future__ import annotations

import asyncio

import pytest

from rayllm_app.replica.http_forward import Reply, Usage
from rayllm_app.replica.stream_channel import RouterChannels
from rayllm_app.router import streaming
from rayllm_app.router.migration import Attempts
from rayllm_app.router.streaming import StartedStream, Streams, answer_finished


class FakeCall:
    """A Ray Serve streaming call: its items, then the end; records cancel()."""

    def __init__(self, items: list, delay_last: float = 0.0) -> None:
        self.items = list(items)
        self.delay_last = delay_last
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled or not self.items:
            raise StopAsyncIteration
        if len(self.items) == 1 and self.delay_last:
            await asyncio.sleep(self.delay_last)
        return self.items.pop(0)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


async def read_then_leave(relay, chunks_wanted: int) -> list[bytes]:
    """Read some chunks, then close the relay as Starlette does when the client goes away."""
    got = []
    async for chunk in relay:
        got.append(chunk)
        if len(got) == chunks_wanted:
            break
    await relay.aclose()
    return got


def channel_relay():
    """A channelled stream's relay, its subscription, and what it settled with: [(usage, status)]."""
    channels = RouterChannels()
    sub = channels.open()
    started = StartedStream(FakeCall([]), Reply(200, b"data: {}\n\n", {}), sub, channels)
    ended: list = []
    return sub, Streams(channels, None).relay(started, "m", None, None, lambda u, s: ended.append((u, s))), ended


async def settled(ended: list) -> None:
    for _ in range(100):
        if ended:
            return
        await asyncio.sleep(0.01)


def test_answer_finished_knows_each_apis_last_event():
    assert answer_finished(b'data: {"x": 1}\n\ndata: [DONE]\n\n')
    assert answer_finished(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
    assert answer_finished(b'event: response.completed\ndata: {}\n\n')
    assert not answer_finished(b'data: {"choices": [{"delta": {"content": "[DONE"}}]}\n\n')
    assert not answer_finished(b'event: content_block_delta\ndata: {}\n\n')


@pytest.mark.parametrize("leave_after_last", [True, False])
def test_channel_relay_waits_for_the_usage_only_after_a_whole_answer(leave_after_last: bool):
    async def main():
        channels = RouterChannels()
        sub = channels.open()
        call = FakeCall([])
        started = StartedStream(call, Reply(200, b"data: {}\n\n", {}), sub, channels)
        ended: list = []
        relay = Streams(channels, None).relay(started, "m", None, None, lambda u, s: ended.append((u, s)))
        sub.push(b'data: {"a": 1}\n\n')
        sub.push(b"data: [DONE]\n\n" if leave_after_last else b'data: {"b": 2}\n\n')
        await read_then_leave(relay, 2)
        await asyncio.sleep(0.05)
        if not leave_after_last:
            assert ended == [(None, 499)] and call.cancelled  # mid-answer: abort, charge the reservation
            return
        assert ended == [] and not call.cancelled  # the usage is still on its way
        sub.end(Usage(7, 3))
        await settled(ended)
        assert ended == [(Usage(7, 3), 200)] and call.cancelled

    run(main())


def test_channel_relay_keeps_a_usage_that_came_before_the_client_left():
    async def main():
        sub, relay, ended = channel_relay()
        sub.push(b"data: [DONE]\n\n")
        sub.end(Usage(4, 1))  # already received, not yet read by the relay
        await read_then_leave(relay, 2)
        await settled(ended)
        assert ended == [(Usage(4, 1), 200)]

    run(main())


def test_channel_relay_gives_up_on_a_usage_that_never_comes(monkeypatch):
    monkeypatch.setattr(streaming, "END_GRACE_S", 0.2)

    async def main():
        sub, relay, ended = channel_relay()
        sub.push(b"data: [DONE]\n\n")
        await read_then_leave(relay, 2)
        await asyncio.sleep(0.5)
        assert ended == [(None, 499)]

    run(main())


def test_ray_relay_reads_the_last_item_after_the_client_left():
    async def main():
        call = FakeCall([b'data: {"a": 1}\n\n', b"data: [DONE]\n\n", Usage(5, 2)], delay_last=0.1)
        started = StartedStream(call, Reply(200, b"data: {}\n\n", {}), None, None)
        ended: list = []
        relay = Streams(None, None).relay(started, "m", None, None, lambda u, s: ended.append((u, s)))
        await read_then_leave(relay, 3)
        assert ended == []
        await settled(ended)
        assert ended == [(Usage(5, 2), 200)] and call.cancelled

    run(main())


def _tracked(channels: RouterChannels, first: bytes, tokens: tuple[int, ...]):
    sub = channels.open(track=True)
    reply = Reply(200, first, {}, tokens=tokens)
    sub.push_reply(reply)
    sub.items.clear()  # start() has taken the Reply already
    return sub, reply


@pytest.mark.parametrize("limit", [1, 0])
def test_channel_relay_resumes_a_tracked_stream_once_within_the_limit(monkeypatch, limit: int):
    """A replica failure mid-stream: the relay asks another replica to continue from the ids the
    client has, under the stream's id and created; past the limit, the error event as before."""
    from rayllm_app.errors import ReplicaFailedError
    from rayllm_app.replica.http_forward import ForwardedRequest

    async def main():
        channels = RouterChannels()
        opening = b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":77}\n\n'
        sub, reply = _tracked(channels, opening, ())
        forwarded = ForwardedRequest("POST", "/v1/chat/completions", b"{}", "", (("content-type", "application/json"),))
        started = StartedStream(FakeCall([]), reply, sub, channels, handle=object(), forwarded=forwarded)
        calls: list = []
        resumed_sub, resumed_reply = _tracked(channels, b"data: c2\n\n", (9,))

        async def start(handle, forwarded, model, timeout, deadline, track=False, resume=None):
            calls.append((forwarded, track, resume))
            if len(calls) == 2:  # the replica it resumed on fails too
                raise ReplicaFailedError("gone again")
            return StartedStream(FakeCall([]), resumed_reply, resumed_sub, channels, handle, forwarded)

        streams = Streams(channels, None)
        monkeypatch.setattr(streams, "start", start)
        ended: list = []
        relay = streams.relay(started, "m", None, None, lambda u, s: ended.append((u, s)), Attempts(limit))
        sub.push_tracked(bytearray(b"\x00\x00\x00\x02" + bytes([7, 0, 0, 0, 8, 0, 0, 0]) + b"data: c1\n\n"), 0, 22)
        sub.fail(ReplicaFailedError("replica died"))
        resumed_sub.push(b"data: [DONE]\n\n")
        resumed_sub.end(Usage(3, 4))
        got = [chunk async for chunk in relay]
        if limit == 0:
            assert got[:2] == [opening, b"data: c1\n\n"] and b"replica_failed" in got[2] and calls == []
            assert ended == [(None, 503)]
            return
        assert got == [opening, b"data: c1\n\n", b"data: c2\n\n", b"data: [DONE]\n\n"]
        forwarded_again, track, resume = calls[0]
        assert track and resume.tokens == (7, 8) and resume.created == 77
        assert ("x-request-id", "abc") in forwarded_again.headers
        assert ended == [(Usage(3, 4), 200)]

    run(main())


def test_channel_relay_counts_a_usage_that_follows_the_calls_cancellation():
    """A client that leaves at ``[DONE]`` makes Ray Serve cancel the replica's call; the call's
    failure reaches the stream before the END frame the replica still sends. The usage counts."""
    from rayllm_app.errors import EngineError

    async def main():
        sub, relay, ended = channel_relay()
        sub.push(b"data: [DONE]\n\n")
        await read_then_leave(relay, 2)
        sub.fail(EngineError("the request was cancelled"))  # the watcher sees the call cancelled
        await asyncio.sleep(0.05)
        assert ended == []
        sub.end(Usage(6, 2))
        await settled(ended)
        assert ended == [(Usage(6, 2), 200)]

    run(main())
