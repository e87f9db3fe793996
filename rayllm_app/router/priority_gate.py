"""Low priority waits first: a model's low-priority requests may hold only a share of its
engine's batch slots, and past that share they queue here, in the router, in arrival order.

Why at the router: vLLM's priority scheduling orders the engine's waiting queue, but it does
not preempt a running request for a waiting one, so once low-priority requests fill every
batch slot a high-priority request still waits for one to finish. Keeping some slots free of
low-priority work lets normal and high requests start at once, however many low ones wait.
A low request that waits longer than the router's ``low_priority_wait_s`` gets 429.
"""

from __future__ import annotations

import asyncio
from collections import deque

from rayllm_app.errors import OverloadedError


class _Lane:
    __slots__ = ("active", "waiters")

    def __init__(self) -> None:
        self.active = 0
        self.waiters: deque[asyncio.Future] = deque()


class PriorityGate:
    def __init__(self) -> None:
        self._lanes: dict[str, _Lane] = {}

    def waiting(self, model: str) -> int:
        lane = self._lanes.get(model)
        return len(lane.waiters) if lane is not None else 0

    async def enter(self, model: str, slots: int, wait_s: float) -> None:
        """Take one of the model's ``slots`` low-priority slots, waiting up to ``wait_s``."""
        lane = self._lanes.setdefault(model, _Lane())
        if lane.active < slots and not lane.waiters:
            lane.active += 1
            return
        turn = asyncio.get_running_loop().create_future()
        lane.waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), wait_s)
        except BaseException as error:
            if turn.done() and not turn.cancelled():  # the slot came just as we gave up: pass it on
                self.leave(model)
            else:
                turn.cancel()
                try:
                    lane.waiters.remove(turn)
                except ValueError:
                    pass
            if isinstance(error, asyncio.TimeoutError):
                raise OverloadedError(
                    f"Model '{model}' is busy and low-priority requests wait for it first; this one waited "
                    f"{wait_s:g} s. Retry later.", retry_after_s=max(int(wait_s), 1)) from None
            raise

    def leave(self, model: str) -> None:
        """Give a slot back: to the first waiter, or free it."""
        lane = self._lanes[model]
        while lane.waiters:
            turn = lane.waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on; active stays the same
                return
        lane.active -= 1
