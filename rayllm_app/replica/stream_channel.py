"""The stream channel: model replicas send streamed response bytes straight to the router.

Why: Ray Serve returns every item a streaming call yields as its own Ray object, which
costs the replica and the router each 0.1-0.2 ms of CPU per token; with many streams
that is most of the serving overhead. The channel multiplexes every stream one replica
sends to one router over a single TCP connection, and writes all frames produced in an
event-loop turn with one syscall.

The Ray Serve call still carries each request, so routing, queue limits, backpressure,
autoscaling, draining and cancellation work as before: the call stays open while its
stream runs, and its only item is a :class:`Ticket` with the channel's address. The
bytes travel under the stream id the router chose. A replica sends a router's frames
only to the connection that presented that router's id: 128 random bits the router
passes over Ray, never over the channel's network.

Wire format: the router opens with ``HELLO + router id``; the replica then sends frames
``stream id (u64) | kind (u8) | length (u32) | payload``. An END frame's payload is the
stream's usage (prompt and completion tokens, two u32), or empty when it has none. A
TOKENS frame is a DATA frame of a tracked stream (rayllm_app.replica.resume): ``count (u32) |
token ids (count x u32, little-endian) | bytes``, one frame, so the router never holds ids
without their text or text without its ids.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import struct
import sys
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from rayllm_app.replica.http_forward import Reply, Usage

logger = logging.getLogger(__name__)

HELLO = b"RAYLLM-STREAM/2\n"
ROUTER_ID_BYTES = 16
FRAME = struct.Struct("!QBI")
DATA, REPLY, END, TOKENS = 0, 1, 2, 3
HOST_ENV = "RAYLLM_STREAM_CHANNEL_HOST"
CONNECT_TIMEOUT_S = 3.0
UNCLAIMED_TIMEOUT_S = 30.0  # a router that never connects: its streams fail after this
BAD_ADDRESS_RETRY_S = 60.0  # an address that could not be reached is not retried sooner


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """Sent with a streaming call: where the replica should send the stream."""

    router_id: bytes
    stream_id: int
    track: bool = False  # send the token ids of each chunk, so the stream can be resumed elsewhere


@dataclass(frozen=True, slots=True)
class Ticket:
    """The first (and only) item of a channelled call: where the replica's channel listens."""

    host: str
    port: int


class ChannelClosed(ConnectionError):
    """The connection between a replica and a router is gone (or was never made)."""


_HEAD_LENGTH = struct.Struct("!I")
_USAGE = struct.Struct("!II")
_COUNT = struct.Struct("!I")


def _token_bytes(tokens: list[int]) -> bytes:
    ids = array("I", tokens)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids.tobytes()


def _token_ids(raw: bytes | bytearray) -> array:
    ids = array("I")
    ids.frombytes(raw)
    if sys.byteorder != "little":
        ids.byteswap()
    return ids


def _encode_reply(reply: Reply) -> bytes:
    """A REPLY frame's payload: the length of the JSON head (status, headers, token ids of a
    tracked stream), the head, the body."""
    head = {"status": reply.status_code, "headers": reply.headers}
    if reply.tokens is not None:
        head["tokens"] = list(reply.tokens)
    encoded = json.dumps(head).encode()
    return _HEAD_LENGTH.pack(len(encoded)) + encoded + reply.body


def _decode_reply(payload: bytes) -> Reply:
    (length,) = _HEAD_LENGTH.unpack_from(payload)
    fields = json.loads(payload[_HEAD_LENGTH.size:_HEAD_LENGTH.size + length])
    tokens = fields.get("tokens")
    return Reply(fields["status"], payload[_HEAD_LENGTH.size + length:], fields["headers"],
                 tokens=tuple(tokens) if tokens is not None else None)


# ------------------------------------------------------------------- the replica's side


class _Peer:
    """One router, as a replica sees it: its connection, and frames waiting to go out."""

    __slots__ = ("loop", "transport", "buffer", "scheduled", "closed", "since", "frames", "writes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scheduled = False
        self.closed = False
        self.since = loop.time()
        self.frames = 0
        self.writes = 0

    def write(self, stream_id: int, kind: int, payload: bytes) -> None:
        if self.closed:
            raise ChannelClosed("the router's stream connection closed")
        if self.transport is None and self.loop.time() - self.since > UNCLAIMED_TIMEOUT_S:
            raise ChannelClosed(f"the router did not connect within {UNCLAIMED_TIMEOUT_S:g} s")
        self.buffer += FRAME.pack(stream_id, kind, len(payload))
        self.buffer += payload
        self.frames += 1
        if self.transport is not None and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)  # after every stream woken in this turn has written

    def flush(self) -> None:
        self.scheduled = False
        if self.transport is not None and self.buffer and not self.closed:
            self.transport.write(bytes(self.buffer))
            self.buffer.clear()
            self.writes += 1


class _ReplicaProtocol(asyncio.Protocol):
    """A router's connection to a replica: reads its hello, then only writes."""

    def __init__(self, server: ReplicaChannelServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.router_id: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.router_id is not None:
            return
        self.received += data
        if len(self.received) < len(HELLO) + ROUTER_ID_BYTES:
            return
        if not self.received.startswith(HELLO):
            self.transport.close()
            return
        self.router_id = bytes(self.received[len(HELLO):len(HELLO) + ROUTER_ID_BYTES])
        self.server._attach(self.router_id, self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.router_id is not None:
            self.server._detach(self.router_id, self.transport)


class ReplicaChannelServer:
    """Listens for routers on this node and sends them their streams' frames."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: asyncio.AbstractServer, host: str) -> None:
        self.loop = loop
        self._server = server
        self.ticket = Ticket(host, server.sockets[0].getsockname()[1])
        self._peers: dict[bytes, _Peer] = {}

    @classmethod
    async def start(cls, host: str | None = None) -> ReplicaChannelServer:
        host = host or os.environ.get(HOST_ENV) or _node_ip()
        loop = asyncio.get_running_loop()
        holder: list[ReplicaChannelServer] = []
        server = await loop.create_server(lambda: _ReplicaProtocol(holder[0]), host, 0)
        holder.append(cls(loop, server, host))
        logger.info("Stream channel listening on %s:%d", host, holder[0].ticket.port)
        return holder[0]

    def _peer(self, router_id: bytes) -> _Peer:
        peer = self._peers.get(router_id)  # closed peers never stay here (see _attach, _detach)
        if peer is None:
            peer = self._peers[router_id] = _Peer(self.loop)
        return peer

    def _attach(self, router_id: bytes, transport: asyncio.Transport) -> None:
        peer = self._peer(router_id)
        if peer.transport is not None:  # the router reconnected: streams of the old link fail
            peer.closed = True
            peer = self._peers[router_id] = _Peer(self.loop)
        peer.transport = transport
        peer.flush()

    def _detach(self, router_id: bytes, transport: asyncio.Transport) -> None:
        peer = self._peers.get(router_id)
        if peer is not None and peer.transport is transport:
            peer.closed = True
            del self._peers[router_id]

    def send(self, request: ChannelRequest, item: bytes | Reply, tokens: list[int] | None = None) -> None:
        if isinstance(item, Reply):
            self._peer(request.router_id).write(request.stream_id, REPLY, _encode_reply(item))
        elif tokens:
            self._peer(request.router_id).write(
                request.stream_id, TOKENS, _COUNT.pack(len(tokens)) + _token_bytes(tokens) + item)
        else:
            self._peer(request.router_id).write(request.stream_id, DATA, item)

    def end(self, request: ChannelRequest, usage: Usage | None = None) -> None:
        payload = _USAGE.pack(usage.prompt_tokens, usage.completion_tokens) if usage is not None else b""
        self._peer(request.router_id).write(request.stream_id, END, payload)

    def describe(self) -> dict[str, Any]:
        connected = [peer for peer in self._peers.values() if peer.transport is not None]
        return {"host": self.ticket.host, "port": self.ticket.port, "routers": len(connected),
                "frames": sum(peer.frames for peer in connected), "writes": sum(peer.writes for peer in connected)}

    def close(self) -> None:
        self._server.close()


def _node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


# ------------------------------------------------------------------- the router's side


class Subscription:
    """One stream's frames as the router receives them, in order."""

    __slots__ = ("request", "items", "waiter", "ended", "error", "connection", "watcher", "usage", "tokens")

    def __init__(self, request: ChannelRequest) -> None:
        self.request = request
        self.items: deque[bytes | Reply] = deque()
        self.waiter: asyncio.Future | None = None
        self.ended = False
        self.error: BaseException | None = None
        self.connection: _RouterProtocol | None = None
        self.watcher: asyncio.Future | None = None
        self.usage: Usage | None = None  # from the END frame
        # A tracked stream's token ids, for every chunk received (and so relayed); None until
        # the replica's Reply says the stream is tracked.
        self.tokens: array | None = None

    def watch(self, coroutine: Any) -> None:
        """Run a task for as long as the stream is open (cancelled when it closes)."""
        self.watcher = asyncio.ensure_future(coroutine)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def push(self, item: bytes | Reply) -> None:
        self.items.append(item)
        self._wake()

    def push_reply(self, reply: Reply) -> None:
        """The stream's Reply; a tracked stream's starts its token ids (once per stream, not per chunk)."""
        if reply.tokens is not None:
            self.tokens = array("I", reply.tokens)
        self.push(reply)

    def push_tracked(self, buffer: bytearray, start: int, end: int) -> None:
        """A TOKENS frame's payload (``buffer[start:end]``): its ids, then its bytes."""
        (count,) = _COUNT.unpack_from(buffer, start)
        ids_end = start + _COUNT.size + 4 * count
        if self.tokens is None:
            self.tokens = array("I")
        self.tokens += _token_ids(buffer[start + _COUNT.size:ids_end])
        self.items.append(bytes(buffer[ids_end:end]))
        self._wake()

    def end(self, usage: Usage | None = None) -> None:
        self.usage = usage
        self.ended = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.ended and self.error is None:
            self.error = error
            self._wake()

    async def usage_at_end(self) -> Usage | None:
        """The END frame's usage, once it comes, dropping what comes before it. A failure of
        the call does not end this wait: when a client leaves right after a whole answer, Ray
        Serve cancels the call (and so fails the stream) while the END frame may still be on
        the way. The caller bounds the wait."""
        while not self.ended:
            self.items.clear()
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.usage

    async def get(self) -> bytes | Reply | None:
        """The next bytes (everything already received, joined), a Reply, or None at
        the end; raises what failed the stream once nothing received is left."""
        while not self.items:
            if self.ended:
                return None
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        first = self.items.popleft()
        if not self.items or not isinstance(first, bytes):
            return first
        parts = [first]
        while self.items and isinstance(self.items[0], bytes):
            parts.append(self.items.popleft())  # type: ignore[arg-type]
        return b"".join(parts)


class _RouterProtocol(asyncio.Protocol):
    """The router's connection to one replica: parses frames, hands them to streams."""

    def __init__(self, channels: RouterChannels, address: tuple[str, int]) -> None:
        self.channels = channels
        self.address = address
        self.buffer = bytearray()
        self.streams: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(HELLO + self.channels.router_id)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        subs = self.channels._subs
        offset, size, header = 0, len(buffer), FRAME.size
        while size - offset >= header:
            stream_id, kind, length = FRAME.unpack_from(buffer, offset)
            end = offset + header + length
            if end > size:
                break
            sub = subs.get(stream_id)
            if sub is not None:
                if kind == DATA:
                    sub.push(bytes(buffer[offset + header:end]))
                elif kind == TOKENS:
                    sub.push_tracked(buffer, offset + header, end)
                elif kind == END:
                    sub.end(Usage(*_USAGE.unpack_from(buffer, offset + header)) if length == _USAGE.size
                            else None)
                else:
                    sub.push_reply(_decode_reply(bytes(buffer[offset + header:end])))
            offset = end
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.channels._lost(self)
        error = ChannelClosed(f"the stream connection to the replica at {self.address[0]}:{self.address[1]} "
                              "closed")
        for stream_id in list(self.streams):
            sub = self.channels._subs.get(stream_id)
            if sub is not None:
                sub.fail(error)


class RouterChannels:
    """A router's channels to every replica it streams from, one connection each."""

    def __init__(self) -> None:
        self.router_id = os.urandom(ROUTER_ID_BYTES)
        self._ids = itertools.count(1)
        self._subs: dict[int, Subscription] = {}
        self._connections: dict[tuple[str, int], asyncio.Future[_RouterProtocol]] = {}
        self._unreachable: dict[tuple[str, int], float] = {}

    def open(self, track: bool = False) -> Subscription:
        """A new stream, registered before its call goes out so no frame is missed."""
        sub = Subscription(ChannelRequest(self.router_id, next(self._ids), track))
        self._subs[sub.request.stream_id] = sub
        return sub

    def close(self, sub: Subscription) -> None:
        self._subs.pop(sub.request.stream_id, None)
        if sub.watcher is not None:
            sub.watcher.cancel()
        if sub.connection is not None:
            sub.connection.streams.discard(sub.request.stream_id)

    def usable(self, ticket: Ticket) -> bool:
        until = self._unreachable.get((ticket.host, ticket.port))
        return until is None or until < asyncio.get_running_loop().time()

    async def attach(self, sub: Subscription, ticket: Ticket) -> None:
        """Join the stream to the replica's connection, connecting first if needed.

        Raises ChannelClosed when the replica cannot be reached; the caller falls back to
        streaming over Ray.
        """
        address = (ticket.host, ticket.port)
        pending = self._connections.get(address)
        if pending is None or (pending.done() and (pending.exception() or pending.result().lost)):
            pending = self._connections[address] = asyncio.ensure_future(self._connect(address))
        try:
            connection = await asyncio.shield(pending)
        except (OSError, asyncio.TimeoutError) as error:
            if self._connections.get(address) is pending:
                del self._connections[address]
            self._unreachable[address] = asyncio.get_running_loop().time() + BAD_ADDRESS_RETRY_S
            logger.warning("Stream channel to %s:%d unreachable (%s); streaming over Ray instead",
                           *address, error)
            raise ChannelClosed(str(error)) from error
        sub.connection = connection
        connection.streams.add(sub.request.stream_id)
        if connection.lost:
            sub.fail(ChannelClosed("the stream connection to the replica closed"))

    async def _connect(self, address: tuple[str, int]) -> _RouterProtocol:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: _RouterProtocol(self, address), *address), CONNECT_TIMEOUT_S)
        return protocol

    def _lost(self, connection: _RouterProtocol) -> None:
        pending = self._connections.get(connection.address)
        if pending is not None and pending.done() and not pending.exception() and pending.result() is connection:
            del self._connections[connection.address]

    def stats(self) -> dict[str, Any]:
        return {"streams": len(self._subs), "connections": len(self._connections)}
