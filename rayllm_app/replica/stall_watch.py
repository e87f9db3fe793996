"""A stalled engine: alive, with requests in it, but making no steps.

Why: an engine core that hangs (a stuck collective, a GPU fault, SIGSTOP) still answers
vLLM's own health check, so the replica looks healthy while its streams wait forever (Ray
Serve LLM has this bug: ray#61263). The replica's health check asks :meth:`EngineProgress.stalled`;
once it fails, Ray Serve replaces the replica and the router resumes its streams elsewhere.

Progress is an engine step (vLLM calls its stat loggers once per step, so this costs nothing
per token). A request that arrives at an engine that has not stepped for a while starts the
clock only then, so an idle engine is never called stalled.
"""

from __future__ import annotations

import time


class EngineProgress:
    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self.last_step = time.monotonic()
        self.waiting_since: float | None = None  # the first request submitted since the last step
        self.declared: float | None = None  # when it was called stalled: for good, see stalled()

    def step(self) -> None:
        self.last_step = time.monotonic()
        self.waiting_since = None

    def submitted(self) -> None:
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def stalled(self, unfinished: int, now: float | None = None) -> float | None:
        """Seconds without a step while requests waited, when past the limit; else None. Once
        stalled, always stalled: failing its requests empties the engine, and an engine that hung
        once must not take new requests, even if it steps again before Ray Serve (three failed
        checks in a row) replaces the replica."""
        now = time.monotonic() if now is None else now
        if self.declared is not None:
            return now - self.declared + self.stall_after_s
        if unfinished <= 0:
            return None
        since = max(self.last_step, self.waiting_since or self.last_step)
        idle = now - since
        if idle <= self.stall_after_s:
            return None
        self.declared = now - (idle - self.stall_after_s)
        return idle
