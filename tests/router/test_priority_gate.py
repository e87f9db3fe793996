"""The router's low-priority gate: a bounded number of slots, FIFO waiters, 429 after the wait."""

from __future__ import annotations

import asyncio

import pytest

from rayllm_app.errors import OverloadedError
from rayllm_app.router.priority_gate import PriorityGate


def test_slots_then_fifo_waiters_then_timeout():
    async def main() -> None:
        gate = PriorityGate()
        await gate.enter("m", 2, 1.0)
        await gate.enter("m", 2, 1.0)
        order: list[int] = []

        async def waiter(n: int) -> None:
            await gate.enter("m", 2, 5.0)
            order.append(n)

        tasks = [asyncio.ensure_future(waiter(n)) for n in range(3)]
        await asyncio.sleep(0.01)
        assert gate.waiting("m") == 3 and order == []
        gate.leave("m")
        await asyncio.sleep(0.01)
        assert order == [0]            # the first waiter got the freed slot
        gate.leave("m")
        gate.leave("m")
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2] and gate.waiting("m") == 0
        for _ in range(2):             # the two holders finish
            gate.leave("m")
        await asyncio.gather(*tasks)
        await gate.enter("m", 1, 0.1)  # every slot was given back: one is free
        with pytest.raises(OverloadedError) as refused:
            await gate.enter("m", 1, 0.05)
        assert refused.value.status_code == 429 and "low-priority" in refused.value.message
        assert gate.waiting("m") == 0  # the timed-out waiter left the queue
        await gate.enter("other", 1, 0.05)  # models have their own slots

    asyncio.run(main())


def test_cancelled_waiter_does_not_take_a_slot():
    async def main() -> None:
        gate = PriorityGate()
        await gate.enter("m", 1, 1.0)
        waiting = asyncio.ensure_future(gate.enter("m", 1, 5.0))
        await asyncio.sleep(0.01)
        waiting.cancel()               # the client went away while waiting
        await asyncio.sleep(0.01)
        gate.leave("m")
        await gate.enter("m", 1, 0.1)  # the slot is free again, not lost to the cancelled waiter

    asyncio.run(main())
