"""The idle-sleep state machine with a fake engine (vLLM's sleep mode needs a GPU; the real
thing is measured on H200s, benchmarks/results/): sleeping after idle, one wake for many
waiting requests, no sleep with requests in flight, a bounded wait, metrics, and the router
side's sleeping state."""

from __future__ import annotations

import asyncio

import pytest

from rayllm_app.errors import ModelUnavailableError
from rayllm_app.replica.idle_sleep import AWAKE, SLEEPING, IdleSleep


class FakeEngine:
    def __init__(self, wake_s: float = 0.05, sleep_s: float = 0.02) -> None:
        self.calls: list[str] = []
        self.wake_s = wake_s
        self.sleep_s = sleep_s
        self.asleep = False

    async def sleep(self, level: int) -> None:
        self.calls.append(f"sleep{level}")
        await asyncio.sleep(self.sleep_s)
        self.asleep = True

    async def wake_up(self, level: int) -> None:
        self.calls.append("wake")
        await asyncio.sleep(self.wake_s)
        self.asleep = False


class Recorder:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def __call__(self, name: str):
        recorder = self

        class Metric:
            def inc(self, value, tags):
                recorder.values.setdefault(name, []).append(value)

            observe = inc

        return Metric()


async def request(sleeper: IdleSleep, engine: FakeEngine, seconds: float = 0.01) -> bool:
    """One request: wakes the engine if needed, and must find it awake while it runs."""
    await sleeper.enter()
    try:
        assert not engine.asleep
        await asyncio.sleep(seconds)
        return True
    finally:
        sleeper.leave()


def test_sleeps_when_idle_and_one_wake_serves_every_waiting_request():
    async def main() -> None:
        engine, metrics, states = FakeEngine(), Recorder(), []
        sleeper = IdleSleep(engine, "m", after_s=0.1, level=1, wake_timeout_s=5, metric=metrics,
                            on_change=states.append)
        sleeper.start(check_every_s=0.02)
        await request(sleeper, engine)
        await asyncio.sleep(0.05)
        assert sleeper.state == AWAKE and engine.calls == []   # not idle long enough
        await asyncio.sleep(0.2)
        assert sleeper.state == SLEEPING and engine.calls == ["sleep1"]
        results = await asyncio.gather(*(request(sleeper, engine) for _ in range(8)))
        assert all(results) and engine.calls == ["sleep1", "wake"]  # eight requests, one wake
        assert states[:4] == ["falling_asleep", "sleeping", "waking", "awake"]
        assert metrics.values["rayllm_sleeps_total"] == [1] and metrics.values["rayllm_wakes_total"] == [1]
        assert 0.04 <= metrics.values["rayllm_wake_seconds"][0] < 1.0
        assert metrics.values["rayllm_wake_seconds_total"] == metrics.values["rayllm_wake_seconds"]
        assert metrics.values["rayllm_asleep_seconds_total"][0] > 0
        sleeper.stop()

    asyncio.run(main())


def test_never_sleeps_with_a_request_in_flight():
    async def main() -> None:
        engine = FakeEngine()
        sleeper = IdleSleep(engine, "m", after_s=0.05, level=1, wake_timeout_s=5)
        sleeper.start(check_every_s=0.01)
        long = asyncio.ensure_future(request(sleeper, engine, seconds=0.3))  # longer than after_s
        await asyncio.sleep(0.2)
        assert engine.calls == [] and sleeper.state == AWAKE
        assert await long
        assert await sleeper.sleep("by hand") is True and engine.calls == ["sleep1"]
        sleeper.stop()

    asyncio.run(main())


def test_request_during_falling_asleep_waits_for_the_wake():
    async def main() -> None:
        engine = FakeEngine(sleep_s=0.1)
        sleeper = IdleSleep(engine, "m", after_s=100, level=2, wake_timeout_s=5)
        falling = asyncio.ensure_future(sleeper.sleep("by hand"))
        await asyncio.sleep(0.02)                     # the engine is going to sleep now
        assert await request(sleeper, engine)        # it waits, then finds the engine awake
        assert await falling and engine.calls == ["sleep2", "wake"]

    asyncio.run(main())


def test_manual_sleep_waits_for_in_flight_requests_or_gives_up():
    async def main() -> None:
        engine = FakeEngine()
        sleeper = IdleSleep(engine, "m", after_s=100, level=1, wake_timeout_s=5)
        running = asyncio.ensure_future(request(sleeper, engine, seconds=0.5))
        await asyncio.sleep(0.01)
        assert await sleeper.sleep("by hand", drain_s=0.05) is False and engine.calls == []
        assert await sleeper.sleep("by hand", drain_s=2.0) is True   # once the request is done
        assert await running and engine.calls == ["sleep1"]
        await sleeper.wake("by hand")
        assert sleeper.state == AWAKE and engine.calls == ["sleep1", "wake"]

    asyncio.run(main())


def test_a_slow_wake_gives_503_but_goes_on_for_the_next_request():
    async def main() -> None:
        engine = FakeEngine(wake_s=0.3)
        sleeper = IdleSleep(engine, "m", after_s=100, level=1, wake_timeout_s=0.1)
        await sleeper.sleep()
        with pytest.raises(ModelUnavailableError) as error:
            await request(sleeper, engine)
        assert error.value.status_code == 503 and "waking" in error.value.message
        assert sleeper.active == 0                   # the failed request was not left counted
        await asyncio.sleep(0.3)
        assert sleeper.state == AWAKE and await request(sleeper, engine)
        assert engine.calls == ["sleep1", "wake"]   # the wake was not restarted

    asyncio.run(main())


def test_router_shows_sleeping_when_every_running_replica_sleeps():
    from rayllm_app.router.model_status import READY, ModelState

    state = ModelState(state=READY, running_replicas=2, sleeping_replicas=1)
    assert state.shown == READY and state.describe()["sleeping_replicas"] == 1
    state.sleeping_replicas = 2
    assert state.shown == "sleeping" and state.describe()["status"] == "sleeping"
    assert ModelState(state=READY, running_replicas=1).describe() == {"status": READY, "running_replicas": 1}
