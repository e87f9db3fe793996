"""RelayResponse: the router's streamed answer without Starlette's per-response task group."""

from __future__ import annotations

import asyncio

import pytest

from rayllm_app.router.relay_response import RelayResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


class Client:
    """An ASGI server's side of one response: what was sent, and a disconnect on demand."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def test_every_chunk_goes_out_then_the_end_of_the_body():
    asyncio.run(asyncio.wait_for(_test_every_chunk_goes_out_then_the_end_of_the_body(), 10))


async def _test_every_chunk_goes_out_then_the_end_of_the_body():
    async def chunks():
        for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            yield part

    client = Client()
    await RelayResponse(chunks(), media_type="text/event-stream")(SCOPE, client.receive, client.send)
    assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
    assert client.bodies() == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n", b""]
    assert client.sent[-1].get("more_body", False) is False
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_listen"]  # listener gone


def test_a_disconnect_stops_the_relay_at_its_wait_and_the_response_ends_quietly():
    asyncio.run(asyncio.wait_for(_test_a_disconnect_stops_the_relay_at_its_wait_and_the_response_ends_quietly(), 10))


async def _test_a_disconnect_stops_the_relay_at_its_wait_and_the_response_ends_quietly():
    release = asyncio.Event()
    closed: list[str] = []

    async def chunks():
        try:
            yield b"data: 1\n\n"
            await release.wait()  # the replica's next frame, which never comes in time
            yield b"data: 2\n\n"
        except asyncio.CancelledError:
            closed.append("cancelled")
            raise
        finally:
            closed.append("finally")

    client = Client()
    response = asyncio.ensure_future(RelayResponse(chunks())(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.01)
    client.gone.set()
    await asyncio.wait_for(response, 2)  # returns normally: the client left, nothing failed
    assert closed == ["cancelled", "finally"]
    assert client.bodies() == [b"data: 1\n\n"]
    assert asyncio.current_task().cancelling() == 0


def test_a_cancellation_from_outside_still_propagates():
    asyncio.run(asyncio.wait_for(_test_a_cancellation_from_outside_still_propagates(), 10))


async def _test_a_cancellation_from_outside_still_propagates():
    async def chunks():
        yield b"data: 1\n\n"
        await asyncio.Event().wait()
        yield b"never"

    client = Client()
    response = asyncio.ensure_future(RelayResponse(chunks())(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.01)
    response.cancel()
    with pytest.raises(asyncio.CancelledError):
        await response


def test_a_disconnect_after_the_stream_ended_changes_nothing():
    asyncio.run(asyncio.wait_for(_test_a_disconnect_after_the_stream_ended_changes_nothing(), 10))


async def _test_a_disconnect_after_the_stream_ended_changes_nothing():
    async def chunks():
        yield b"data: [DONE]\n\n"

    client = Client()
    await RelayResponse(chunks())(SCOPE, client.receive, client.send)
    client.gone.set()
    await asyncio.sleep(0.01)
    assert client.bodies() == [b"data: [DONE]\n\n", b""]
