"""The router's side of a streamed answer: start the replica's call, take its first item
(over the stream channel, or over Ray when the replica's channel cannot be reached), then
relay its bytes to the client. A failure mid-stream becomes an SSE error event, and the
stream's end reports its usage (the replica's count) to whoever settles the request.

When a tracked stream's replica fails mid-stream, the relay resumes it on another replica
(rayllm_app.router.migration): the client sees a pause, not an error, up to the model's
``migration_limit``.

A client may leave as soon as it reads the answer's last event (the OpenAI SDK closes the
connection at ``data: [DONE]``), before the replica's count arrives behind it. Then the relay
waits for the count in the background instead of cancelling the call, so the request is
charged what it used, not what it reserved.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rayllm_app.errors import EngineError, OpenAIError, RequestTimeoutError
from rayllm_app.observability import hop_trace
from rayllm_app.observability.metrics import record_migration
from rayllm_app.replica.http_forward import END_GRACE_S, ForwardedRequest, Reply, Usage, answer_finished
from rayllm_app.replica.resume import KEPT_HEADER, ResumeRequest
from rayllm_app.replica.stream_channel import ChannelClosed, RouterChannels, Subscription, Ticket
from rayllm_app.router.migration import Attempts, stream_identity
from rayllm_app.router.model_calls import ModelCalls, first_of, sse_error, translate_serve_error, watch_call

logger = logging.getLogger(__name__)

OnEnd = Callable[[Usage | None, int], None]


@dataclass
class StartedStream:
    call: Any                       # the Ray Serve streaming call
    first: Any                      # its first item: a Reply (or something unexpected)
    sub: Subscription | None        # the channel subscription, when the bytes come that way
    channels: RouterChannels | None
    handle: ModelCalls | None = None          # what started it: a migration calls again with them
    forwarded: ForwardedRequest | None = None

    def close(self) -> None:
        self.call.cancel()
        if self.sub is not None and self.channels is not None:
            self.channels.close(self.sub)


class Streams:
    def __init__(self, channels: RouterChannels | None,
                 through_cold_start: Callable[[str, Awaitable[Any]], Awaitable[Any]]) -> None:
        self.channels = channels
        self._through_cold_start = through_cold_start
        self._late: set[asyncio.Task] = set()  # usage awaited after the client left

    async def start(self, handle: ModelCalls, forwarded: ForwardedRequest, model: str,
                    timeout: float | None, deadline: float | None, track: bool = False,
                    resume: ResumeRequest | None = None) -> StartedStream:
        """Start the call and wait for its Reply; raises an OpenAIError when it fails first.
        ``track``: ask for each chunk's token ids; ``resume``: continue a broken stream."""
        sub = self.channels.open(track) if self.channels is not None else None
        try:
            call, first = await self._open(handle, forwarded, model, sub, timeout, resume)
            if isinstance(first, Ticket):
                first = await self._first_on_channel(call, first, sub, model, deadline, timeout)
                if first is None:  # the replica's channel is unreachable: stream this one over Ray
                    self.channels.close(sub)
                    sub = None
                    call, first = await self._open(handle, forwarded, model, None, timeout, resume)
            elif sub is not None:  # the replica streams over Ray (it has no channel)
                self.channels.close(sub)
                sub = None
        except BaseException:
            if sub is not None:
                self.channels.close(sub)
            raise
        return StartedStream(call, first, sub, self.channels, handle, forwarded)

    def relay(self, started: StartedStream, model: str, deadline: float | None, timeout: float | None,
              on_end: OnEnd, attempts: Attempts | None = None) -> AsyncIterator[bytes]:
        first = started.first.body
        if started.sub is None:
            return self._relay_ray(first, started.call, model, deadline, timeout, on_end)
        return self._relay_channel(first, started, model, deadline, timeout, on_end, attempts or Attempts(0))

    async def _open(self, handle: ModelCalls, forwarded: ForwardedRequest, model: str,
                    sub: Subscription | None, timeout: float | None,
                    resume: ResumeRequest | None = None) -> tuple[Any, Any]:
        """Start the streaming call and wait for its first item (ticket or Reply)."""
        args = (forwarded, sub.request) if sub is not None else (forwarded,)
        if resume is not None:
            args = (forwarded, sub.request if sub is not None else None, resume)
        hop_trace.mark("router.call")
        stream = handle.streaming.remote(*args)
        first_item = self._through_cold_start(model, stream.__anext__())
        return stream, await first_of(stream, first_item, model, timeout)

    async def _first_on_channel(self, stream: Any, ticket: Ticket, sub: Subscription, model: str,
                                deadline: float | None, timeout: float | None) -> Reply | bytes | None:
        """Join the replica's channel and wait for the stream's first frame; None if the
        replica's channel cannot be reached (the call is cancelled, nothing was sent)."""
        loop = asyncio.get_running_loop()
        try:
            if not self.channels.usable(ticket):
                raise ChannelClosed("marked unreachable")
            await self.channels.attach(sub, ticket)
        except ChannelClosed:
            stream.cancel()
            return None
        sub.watch(watch_call(stream, sub, model))
        first = await first_of(stream, sub.get(), model, timeout,
                                limit=max(deadline - loop.time(), 0) if deadline else None)
        if first is None:
            raise EngineError(f"Model '{model}' ended the stream without output.")
        hop_trace.mark("router.first_frame")
        return first

    async def _relay_channel(self, first: bytes, started: StartedStream, model: str, deadline: float | None,
                             timeout: float | None, on_end: OnEnd, attempts: Attempts) -> AsyncIterator[bytes]:
        """Pass the channel's SSE frames through; a tracked stream whose replica fails resumes
        on another (as ``attempts`` allows); any other failure mid-stream becomes an error event."""
        current = [started]  # the call now relayed: a migration replaces it
        timer = None
        status = 499  # until the stream ends or fails: the client went away
        last = first
        delivered = array("I")  # token ids the client has from replicas that failed
        resuming = False
        if deadline is not None:
            timer = asyncio.get_running_loop().call_at(
                deadline, lambda: current[0].sub.fail(RequestTimeoutError(timeout or 0)))
        try:
            hop_trace.mark("router.first_chunk")
            yield first
            while True:
                try:
                    if resuming:
                        current[0] = await self._resume(current[0], delivered, first, model, timeout, deadline)
                        resuming = False
                        # It continues after the last whole character: what follows is generated again.
                        del delivered[int(current[0].first.headers.get(KEPT_HEADER, len(delivered))):]
                        if body := current[0].first.body:
                            last = body
                            yield body
                    sub = current[0].sub
                    while (chunk := await sub.get()) is not None:
                        if isinstance(chunk, bytes):
                            last = chunk
                            yield chunk
                    break
                except Exception as error:  # noqa: BLE001
                    failure = translate_serve_error(error, model)
                    tokens = None if resuming else current[0].sub.tokens
                    if answer_finished(last) or (not resuming and tokens is None) or not await attempts.allow(failure):
                        raise failure from None
                    if not resuming:
                        delivered += tokens
                        current[0].close()
                    resuming = True
                    reason = failure.reason  # type: ignore[attr-defined]
                    if reason != "rejected":
                        record_migration(model, reason, len(delivered))
                        logger.warning("Resuming a stream of %s on another replica after %d tokens (%s): %s",
                                       model, len(delivered), reason, failure.message)
            status = 200
        except OpenAIError as error:
            status = error.status_code
            yield sse_error(error)
        except Exception as error:  # noqa: BLE001
            failure = translate_serve_error(error, model)
            status = failure.status_code
            yield sse_error(failure)
        finally:
            if timer is not None:
                timer.cancel()
            started = current[0]
            if status == 499 and answer_finished(last):  # its END frame may be here already, or on the way
                self._later(self._end_on_channel(started, on_end))
            else:
                started.close()
                on_end(started.sub.usage if status == 200 else None, status)

    async def _resume(self, broken: StartedStream, delivered: array, opening: bytes, model: str,
                      timeout: float | None, deadline: float | None) -> StartedStream:
        """Continue a broken stream on another replica: the same body, the ids the client has,
        under the stream's id (``X-Request-Id``) and ``created``."""
        request_id, created = stream_identity(opening)
        forwarded = broken.forwarded
        if request_id is not None:
            headers = tuple(item for item in forwarded.headers if item[0] != "x-request-id")
            forwarded = dataclasses.replace(forwarded, headers=(*headers, ("x-request-id", request_id)))
        started = await self.start(broken.handle, forwarded, model, timeout, deadline, track=True,
                                   resume=ResumeRequest(tuple(delivered), created))
        first = started.first
        if not (isinstance(first, Reply) and first.status_code == 200 and started.sub is not None
                and started.sub.tokens is not None):
            started.close()
            raise EngineError(f"Model '{model}' could not resume this stream on another replica.")
        return started

    async def _relay_ray(self, first: bytes, stream: Any, model: str, deadline: float | None,
                         timeout: float | None, on_end: OnEnd) -> AsyncIterator[bytes]:
        """Pass the replica's SSE frames through; a failure mid-stream becomes an error event."""
        loop = asyncio.get_running_loop()
        usage = None
        status = 499
        last = first
        try:
            yield first
            while True:
                try:
                    chunk = await (stream.__anext__() if deadline is None else
                                   asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0)))
                except StopAsyncIteration:
                    break
                if isinstance(chunk, Usage):
                    usage = chunk
                else:
                    last = chunk
                    yield chunk
            status = 200
        except asyncio.TimeoutError:
            status = 504
            yield sse_error(RequestTimeoutError(timeout or 0))
        except Exception as error:  # noqa: BLE001
            failure = translate_serve_error(error, model)
            status = failure.status_code
            yield sse_error(failure)
        finally:
            if status == 499 and answer_finished(last):
                self._later(self._end_over_ray(stream, on_end))
            else:
                stream.cancel()
                on_end(usage, status)

    def _later(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    @staticmethod
    async def _end_on_channel(started: StartedStream, on_end: OnEnd) -> None:
        """The client has the whole answer: wait for the END frame's usage behind it (the
        replica sends it even when the call is cancelled at this point)."""
        sub = started.sub
        try:
            async with asyncio.timeout(END_GRACE_S):
                await sub.usage_at_end()
        except Exception:  # noqa: BLE001 - no usage: the reservation is charged
            pass
        finally:
            started.close()
            on_end(sub.usage, 200 if sub.usage is not None else 499)

    @staticmethod
    async def _end_over_ray(stream: Any, on_end: OnEnd) -> None:
        """The client has the whole answer: wait for the call's last item, its usage."""
        usage = None
        try:
            async with asyncio.timeout(END_GRACE_S):
                async for item in stream:
                    if isinstance(item, Usage):
                        usage = item
        except Exception:  # noqa: BLE001 - no usage: the reservation is charged
            pass
        finally:
            stream.cancel()
            on_end(usage, 200 if usage is not None else 499)
