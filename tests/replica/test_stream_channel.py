"""The stream channel between model replicas and the router, on 127.0.0.1, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from rayllm_app.replica.http_forward import Reply
from rayllm_app.replica.stream_channel import (
    HELLO,
    ChannelClosed,
    ReplicaChannelServer,
    RouterChannels,
    Ticket,
)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


async def drain(sub) -> list:
    items = []
    while (item := await sub.get()) is not None:
        items.append(item)
    return items


def test_interleaved_streams_arrive_in_order_and_apart():
    async def main():
        server = await ReplicaChannelServer.start("127.0.0.1")
        channels = RouterChannels()
        a, b = channels.open(), channels.open()
        for sub in (a, b):
            await channels.attach(sub, server.ticket)
        for i in range(50):
            server.send(a.request, b"a%d;" % i)
            server.send(b.request, b"b%d;" % i)
            if i % 7 == 0:
                await asyncio.sleep(0)  # some frames leave in separate writes
        server.end(a.request)
        server.end(b.request)
        got_a, got_b = b"".join(await drain(a)), b"".join(await drain(b))
        assert got_a == b"".join(b"a%d;" % i for i in range(50))
        assert got_b == b"".join(b"b%d;" % i for i in range(50))
        assert channels.stats() == {"streams": 2, "connections": 1}  # one connection for both
        channels.close(a)
        channels.close(b)
        assert channels.stats()["streams"] == 0
        server.close()

    run(main())


def test_frames_sent_before_the_router_connects_wait_for_it():
    async def main():
        server = await ReplicaChannelServer.start("127.0.0.1")
        channels = RouterChannels()
        sub = channels.open()
        reply = Reply(400, b'{"error": {"message": "bad"}}', {"X-Test": "1"})
        server.send(sub.request, reply)  # the router has not connected yet
        server.end(sub.request)
        await channels.attach(sub, server.ticket)
        first = await sub.get()
        assert isinstance(first, Reply)
        assert (first.status_code, first.body, first.headers) == (400, reply.body, {"X-Test": "1"})
        assert await sub.get() is None
        server.close()

    run(main())


def test_a_router_only_gets_its_own_streams():
    async def main():
        server = await ReplicaChannelServer.start("127.0.0.1")
        mine, other = RouterChannels(), RouterChannels()
        sub = mine.open()
        intruder = other.open()
        # Another router asking for the same stream id on its own connection gets nothing.
        intruder.request = type(sub.request)(other.router_id, sub.request.stream_id)
        await mine.attach(sub, server.ticket)
        await other.attach(intruder, server.ticket)
        server.send(sub.request, b"secret")
        server.end(sub.request)
        assert await drain(sub) == [b"secret"]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(intruder.get(), 0.3)
        # A connection without the hello is dropped.
        reader, writer = await asyncio.open_connection(server.ticket.host, server.ticket.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * len(HELLO))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        server.close()

    run(main())


def test_a_lost_connection_fails_open_streams_after_what_arrived():
    async def main():
        server = await ReplicaChannelServer.start("127.0.0.1")
        channels = RouterChannels()
        sub = channels.open()
        await channels.attach(sub, server.ticket)
        server.send(sub.request, b"partial")
        await asyncio.sleep(0.2)
        for peer in list(server._peers.values()):  # the replica process dies
            peer.transport.abort()
        assert await sub.get() == b"partial"
        with pytest.raises(ChannelClosed):
            await sub.get()
        # A new stream reconnects.
        again = channels.open()
        await channels.attach(again, server.ticket)
        server.send(again.request, b"ok")
        server.end(again.request)
        assert await drain(again) == [b"ok"]
        server.close()

    run(main())


def test_an_unreachable_replica_is_reported_and_not_retried_at_once():
    async def main():
        server = await ReplicaChannelServer.start("127.0.0.1")
        ticket = server.ticket
        server.close()
        await server._server.wait_closed()
        channels = RouterChannels()
        sub = channels.open()
        with pytest.raises(ChannelClosed):
            await channels.attach(sub, Ticket(ticket.host, ticket.port))
        assert not channels.usable(ticket)

    run(main())


def test_a_router_that_never_connects_fails_the_stream(monkeypatch):
    from rayllm_app.replica import stream_channel

    async def main():
        monkeypatch.setattr(stream_channel, "UNCLAIMED_TIMEOUT_S", 0.05)
        server = await ReplicaChannelServer.start("127.0.0.1")
        request = RouterChannels().open().request
        server.send(request, b"waiting")
        await asyncio.sleep(0.1)
        with pytest.raises(ChannelClosed):
            server.send(request, b"more")
        server.close()

    run(main())


def test_a_tracked_stream_carries_each_chunks_token_ids():
    """TOKENS frames: the router keeps the ids of every chunk it received, the Reply's first."""
    async def main():
        server = await ReplicaChannelServer.start("127.0.0.1")
        channels = RouterChannels()
        sub = channels.open(track=True)
        assert sub.request.track
        await channels.attach(sub, server.ticket)
        server.send(sub.request, Reply(200, b"first;", {"content-type": "text/event-stream"}, tokens=(5,)))
        server.send(sub.request, b"a;", [6, 70000])
        server.send(sub.request, b"plain;")
        server.send(sub.request, b"b;", [8])
        server.end(sub.request)
        items = await drain(sub)
        assert items[0].tokens == (5,) and items[0].body == b"first;"
        assert b"".join(items[1:]) == b"a;plain;b;"
        assert list(sub.tokens) == [5, 6, 70000, 8]
        untracked = channels.open()
        await channels.attach(untracked, server.ticket)
        server.send(untracked.request, Reply(200, b"x", {}))
        server.end(untracked.request)
        await drain(untracked)
        assert untracked.tokens is None  # its replica did not say it tracks: never resumed
        server.close()

    run(main())
