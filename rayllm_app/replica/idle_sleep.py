"""An idle replica's engine sleeps; the next request wakes it (``deployment_config.idle_sleep``).

States: ``awake`` -> ``falling_asleep`` -> ``sleeping`` -> ``waking`` -> ``awake``.

* **Sleep** only with no request in flight: vLLM's sleep aborts running requests, so the
  controller counts every request from before it reaches the engine to its last byte, and
  a sleep starts only at zero (checked and begun in one event-loop step, so no request can
  slip in between).
* **Wake** on the first request that finds the engine asleep (or falling asleep); requests
  arriving meanwhile wait for the same wake. The wait is bounded by the model's
  ``cold_start_timeout_s``; past it they get 503, and the wake goes on for the next ones.
* **By hand**: ``sleep()`` / ``wake()`` (the router's admin endpoints reach every replica
  through Ray's internal KV, see replica_state). A manual sleep waits for in-flight
  requests to finish first, up to ``drain_s``.
* **Autoscaling**: a sleeping replica is still a replica (it holds its worker group and its
  weights in CPU memory, for level 1), so Serve counts it as running; it goes to zero on the
  model's own ``downscale_to_zero_delay_s`` like an awake idle one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from rayllm_app.errors import ModelUnavailableError
from rayllm_app.observability.metrics import report_metric

logger = logging.getLogger(__name__)

AWAKE, FALLING_ASLEEP, SLEEPING, WAKING = "awake", "falling_asleep", "sleeping", "waking"


class SleepingEngine(Protocol):
    async def sleep(self, level: int) -> None: ...

    async def wake_up(self, level: int) -> None: ...


class IdleSleep:
    def __init__(self, engine: SleepingEngine, model: str, after_s: float, level: int, wake_timeout_s: float,
                 metric: Callable[[str], Any] | None = None,
                 on_change: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.model = model
        self.after_s = after_s
        self.level = level
        self.wake_timeout_s = wake_timeout_s
        self.state = AWAKE
        self.active = 0
        self._clock = clock
        self.last_active = clock()
        self._asleep_since: float | None = None
        self._lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake: asyncio.Future | None = None
        self._watcher: asyncio.Task | None = None
        self._metric = metric
        self._tags = {"model": model}
        self._on_change = on_change

    # ------------------------------------------------------------------ requests

    async def enter(self) -> None:
        """Before a request reaches the engine: count it, and wake the engine if it sleeps."""
        self.active += 1
        self._idle.clear()
        self.last_active = self._clock()
        if self.state == AWAKE:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._start_wake("request")), self.wake_timeout_s)
        except asyncio.TimeoutError:
            self.leave()
            raise ModelUnavailableError(
                f"Model '{self.model}' is waking from sleep and was not ready within {self.wake_timeout_s:g} s; "
                "retry shortly.", retry_after_s=5) from None
        except BaseException:
            self.leave()
            raise

    def leave(self) -> None:
        """After a request's last byte (or its failure)."""
        self.active -= 1
        self.last_active = self._clock()
        if self.active == 0:
            self._idle.set()

    # ------------------------------------------------------------------ transitions

    def start(self, check_every_s: float | None = None) -> None:
        """Watch for idleness in the background."""
        period = check_every_s if check_every_s is not None else min(max(self.after_s / 4, 0.05), 5.0)
        self._watcher = asyncio.ensure_future(self._watch(period))

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def sleep(self, reason: str = "idle", drain_s: float = 0.0) -> bool:
        """Put the engine to sleep; False if requests were in flight (after ``drain_s``)."""
        if drain_s > 0 and self.active:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_s)
            except asyncio.TimeoutError:
                return False
        async with self._lock:
            if self.state == SLEEPING:
                return True
            if self.active:  # checked and begun in one step: no request slips in between
                return False
            self._set(FALLING_ASLEEP)
            started = time.perf_counter()
            try:
                await self.engine.sleep(self.level)
            except BaseException:
                self._set(AWAKE)
                raise
            self._asleep_since = self._clock()
            self._set(SLEEPING)
            self._count("rayllm_sleeps_total", 1)
            logger.info("Model %s asleep (level %d, %s) after %.2f s", self.model, self.level, reason,
                        time.perf_counter() - started)
            return True

    async def wake(self, reason: str = "request") -> None:
        await asyncio.shield(self._start_wake(reason))

    def _start_wake(self, reason: str) -> asyncio.Future:
        """One wake at a time, shared by everyone who waits for it."""
        if self._wake is None or self._wake.done():
            self._wake = asyncio.ensure_future(self._do_wake(reason))
        return self._wake

    async def _do_wake(self, reason: str) -> None:
        async with self._lock:
            if self.state == AWAKE:
                return
            self._set(WAKING)
            started = time.perf_counter()
            try:
                await self.engine.wake_up(self.level)
            except BaseException:
                self._set(SLEEPING)
                raise
            took = time.perf_counter() - started
            asleep = self._clock() - (self._asleep_since or self._clock())
            self._asleep_since = None
            self._set(AWAKE)
            self.last_active = self._clock()
            self._count("rayllm_wakes_total", 1)
            self._count("rayllm_asleep_seconds_total", asleep)
            self._count("rayllm_wake_seconds_total", took)
            self._observe("rayllm_wake_seconds", took)
            logger.info("Model %s awake (%s) in %.2f s after %.0f s asleep", self.model, reason, took, asleep)

    async def _watch(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            if self.state == AWAKE and self.active == 0 and self._clock() - self.last_active >= self.after_s:
                try:
                    await self.sleep("idle")
                except Exception:  # noqa: BLE001 - the engine stays awake; try again later
                    logger.exception("Model %s could not go to sleep", self.model)
                    self.last_active = self._clock()

    # ------------------------------------------------------------------ reporting

    def _set(self, state: str) -> None:
        self.state = state
        if self._on_change is not None:
            try:
                self._on_change(state)
            except Exception:  # noqa: BLE001 - reporting never changes what the engine does
                logger.debug("sleep state report failed", exc_info=True)

    def _count(self, name: str, value: float) -> None:
        report_metric(self._metric, name, value, self._tags)

    def _observe(self, name: str, value: float) -> None:
        report_metric(self._metric, name, value, self._tags, observe=True)
