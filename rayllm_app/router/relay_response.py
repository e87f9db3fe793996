"""The router's streamed answer: the replica's bytes sent as they come, stopped when the client leaves.

Why not Starlette's ``StreamingResponse`` as it is: uvicorn declares ASGI spec 2.3, so Starlette
runs every streaming response in an anyio task group beside a task that listens for the
client's disconnect. On the router that start is on every stream's first token (0.3-0.7 ms of
``router.first_frame -> router.first_chunk``, benchmarks/results/2026-12-03-hops.md). Here the
listener is one plain asyncio task, and a disconnect cancels the sending task, as Starlette's
cancel scope does: the relay generator sees the cancellation at its next wait and settles the
request as a client that went away (see rayllm_app.router.streaming).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import StreamingResponse


class RelayResponse(StreamingResponse):
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # not served here; kept for the base class's contract
            await super().__call__(scope, receive, send)
            return
        sender = asyncio.current_task()
        assert sender is not None
        state = {"streaming": True, "disconnected": False}
        listener = asyncio.ensure_future(_listen(receive, sender, state))
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise  # cancelled from outside (shutdown): not ours to swallow
            sender.uncancel()
        finally:
            state["streaming"] = False
            listener.cancel()
        if self.background is not None:
            await self.background()


async def _listen(receive: Any, sender: asyncio.Task, state: dict[str, bool]) -> None:
    """Wait for the client's disconnect; then stop the sender if it still streams."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if state["streaming"]:
        state["disconnected"] = True
        sender.cancel()
