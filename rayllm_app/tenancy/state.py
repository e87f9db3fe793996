"""Per-key budgets: the values that cross the store interface, and the algorithm itself.

The algorithm is written once here, in plain Python (``MemoryLimitState``), so it can be
unit-tested without Ray or Redis; the embedded store's Ray actor wraps it unchanged, and the
Redis store's Lua scripts (``redis_store.py``) mirror it line by line. The shared test suite
(tests/tenancy) runs the same cases against both, which is what keeps them identical.

Buckets are token buckets refilled continuously (capacity = the limit, rate = limit / 60 per
second) rather than fixed minute windows: a fixed window admits twice the limit across a
window edge, and a continuous bucket also gives an exact ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

REQUESTS, TOKENS, CONCURRENT = "requests_per_minute", "tokens_per_minute", "max_concurrent_requests"
LEASE_S = 3600.0   # a concurrency slot whose router died is forgotten after this
USAGE_RETENTION_S = 8 * 86400.0   # usage minutes kept: a week's report plus a day of slack
CONCURRENT_RETRY_S = 1.0   # when a concurrency slot frees is unknown: someone must finish
ZERO_RATE_RETRY_S = 60.0   # a limit of 0 never refills; answer something finite


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of buckets: a key ("team-a") or a key on one model ("team-a|model-x")."""
    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(slots=True)
class Decision:
    allowed: bool
    limit: str | None = None          # which limit refused: REQUESTS / TOKENS / CONCURRENT
    scope: str | None = None          # the refusing scope's name
    retry_after_s: float = 0.0        # when refused: seconds until that limit would admit this request
    too_large: bool = False           # tokens asked > the scope's tokens_per_minute: can never pass
    # Rate-limit header values of the FIRST scope in the list that has the limit (None where no
    # scope has it), after this request was counted (when allowed) or as things stand (when refused):
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None   # seconds until the request bucket is full again
    limit_tokens: int | None = None
    remaining_tokens: int | None = None     # may be 0 but never negative in the header value
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    key: str          # key NAME, never the key itself
    model: str
    requests: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0   # 1 when the request ended with status >= 400


@dataclass(frozen=True, slots=True)
class Settlement:
    """One ``settle`` call's arguments, for ``settle_many`` (a router batches its settles)."""

    scopes: list[Scope]
    lease_id: str
    reserved: int
    used: int
    usage: UsageRecord | None = None


@dataclass(frozen=True, slots=True)
class UsageRow:
    key: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int


USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors")


def refill(level: float, updated: float, capacity: float, now: float) -> float:
    """The bucket's level at ``now``; a clock that went backwards refills nothing."""
    return min(capacity, level + capacity / 60.0 * max(0.0, now - updated))


def wait_s(needed: float, level: float, capacity: float) -> float:
    """Seconds until a bucket at ``level`` holds ``needed``."""
    if level >= needed:
        return 0.0
    return (needed - level) / (capacity / 60.0) if capacity > 0 else ZERO_RATE_RETRY_S


def header_values(level: float, capacity: int) -> tuple[int, float]:
    """(remaining, reset seconds) for the rate-limit headers."""
    remaining = max(0, math.floor(level))
    reset = (capacity - level) / (capacity / 60.0) if capacity > 0 and level < capacity else 0.0
    return remaining, reset


def minute_of(t: float) -> int:
    return int(t // 60) * 60


class MemoryLimitState:
    """The whole state of one store, in one process. Not thread-safe: one caller at a time
    (the embedded store's async actor runs every method on one event loop, without awaits).

    A bucket is ``[level, updated, capacity]``; one that has refilled completely is the same as
    no bucket at all, so ``_sweep`` drops those (the Redis store lets them expire instead).
    """

    def __init__(self, clock: Callable[[], float] = time.time,
                 retention_s: float = USAGE_RETENTION_S) -> None:
        self._clock = clock
        self._retention_s = retention_s
        self._buckets: dict[tuple[str, str], list[float]] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._usage: dict[int, dict[tuple[str, str], list[int]]] = {}
        self._swept = clock()

    def _level(self, scope: str, dim: str, capacity: int, now: float) -> float:
        bucket = self._buckets.get((scope, dim))
        return capacity if bucket is None else refill(bucket[0], bucket[1], capacity, now)

    def _set(self, scope: str, dim: str, level: float, capacity: int, now: float) -> None:
        self._buckets[(scope, dim)] = [level, now, capacity]

    def _live_leases(self, scope: str, now: float) -> dict[str, float]:
        leases = self._leases.get(scope, {})
        for lease_id in [k for k, start in leases.items() if start <= now - LEASE_S]:
            del leases[lease_id]
        return leases

    def admit(self, scopes: list[Scope], lease_id: str, tokens: int) -> Decision:
        now = self._clock()
        self._sweep(now)
        refusal: Decision | None = None
        levels: list[tuple[float | None, float | None]] = []

        def refuse(limit: str, scope: Scope, retry: float, too_large: bool = False) -> None:
            nonlocal refusal
            # A request that can never pass outranks any wait; otherwise the longest wait wins.
            if (refusal is None or (too_large and not refusal.too_large)
                    or (not refusal.too_large and retry > refusal.retry_after_s)):
                refusal = Decision(False, limit, scope.name, retry, too_large)

        for scope in scopes:
            req_level = tok_level = None
            if scope.requests_per_minute is not None:
                req_level = self._level(scope.name, REQUESTS, scope.requests_per_minute, now)
                if req_level < 1:
                    refuse(REQUESTS, scope, wait_s(1, req_level, scope.requests_per_minute))
            if scope.tokens_per_minute is not None:
                tok_level = self._level(scope.name, TOKENS, scope.tokens_per_minute, now)
                if tokens > scope.tokens_per_minute:
                    refuse(TOKENS, scope, 0.0, too_large=True)
                elif tok_level < tokens:
                    refuse(TOKENS, scope, wait_s(tokens, tok_level, scope.tokens_per_minute))
            if scope.max_concurrent_requests is not None:
                leases = self._live_leases(scope.name, now)
                if lease_id not in leases and len(leases) >= scope.max_concurrent_requests:
                    refuse(CONCURRENT, scope, CONCURRENT_RETRY_S)
            levels.append((req_level, tok_level))

        decision = refusal or Decision(True)
        for scope, (req_level, tok_level) in zip(scopes, levels):
            if decision.allowed:
                if req_level is not None:
                    req_level -= 1
                    self._set(scope.name, REQUESTS, req_level, scope.requests_per_minute, now)
                if tok_level is not None:
                    tok_level -= tokens
                    self._set(scope.name, TOKENS, tok_level, scope.tokens_per_minute, now)
                if scope.max_concurrent_requests is not None:
                    self._leases.setdefault(scope.name, {})[lease_id] = now
            if req_level is not None and decision.limit_requests is None:
                decision.limit_requests = scope.requests_per_minute
                decision.remaining_requests, decision.reset_requests_s = header_values(
                    req_level, scope.requests_per_minute)
            if tok_level is not None and decision.limit_tokens is None:
                decision.limit_tokens = scope.tokens_per_minute
                decision.remaining_tokens, decision.reset_tokens_s = header_values(
                    tok_level, scope.tokens_per_minute)
        return decision

    def settle(self, scopes: list[Scope], lease_id: str, reserved: int, used: int,
               usage: UsageRecord | None) -> None:
        now = self._clock()
        for scope in scopes:
            if scope.tokens_per_minute is not None:
                capacity = scope.tokens_per_minute
                level = self._level(scope.name, TOKENS, capacity, now)
                self._set(scope.name, TOKENS, min(capacity, level + reserved - used), capacity, now)
            leases = self._leases.get(scope.name)
            if leases is not None:
                leases.pop(lease_id, None)
                if not leases:
                    del self._leases[scope.name]
        if usage is not None:
            self._record(usage, now)

    def _record(self, usage: UsageRecord, now: float) -> None:
        cutoff = now - self._retention_s
        for minute in [m for m in self._usage if m < cutoff]:
            del self._usage[minute]
        row = self._usage.setdefault(minute_of(now), {}).setdefault((usage.key, usage.model), [0, 0, 0, 0])
        for i, name in enumerate(USAGE_FIELDS):
            row[i] += getattr(usage, name)

    def usage(self, since: float, until: float) -> list[UsageRow]:
        return sum_usage((row for minute, rows in self._usage.items()
                          if minute_of(since) <= minute <= until for row in rows.items()))

    def _sweep(self, now: float) -> None:
        """Forget full buckets and empty lease sets, at most once a minute (memory bound)."""
        if now - self._swept < 60.0:
            return
        self._swept = now
        for key in [k for k, (level, updated, capacity) in self._buckets.items()
                    if refill(level, updated, capacity, now) >= capacity]:
            del self._buckets[key]
        for scope in [s for s in self._leases if not self._live_leases(s, now)]:
            del self._leases[scope]


def sum_usage(rows) -> list[UsageRow]:
    """Sum ``((key, model), [requests, prompt, completion, errors])`` pairs into sorted rows."""
    totals: dict[tuple[str, str], list[int]] = {}
    for (key, model), values in rows:
        total = totals.setdefault((key, model), [0, 0, 0, 0])
        for i, value in enumerate(values):
            total[i] += int(value)
    return [UsageRow(key, model, *values) for (key, model), values in sorted(totals.items())]


class MemoryStore:
    """``MemoryLimitState`` behind the async ``LimitStore`` interface: one process only
    (unit tests, a single router replica). Several replicas need the embedded or Redis store."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.state = MemoryLimitState(clock)

    async def admit(self, scopes: list[Scope], lease_id: str, tokens: int) -> Decision:
        return self.state.admit(scopes, lease_id, tokens)

    async def settle(self, scopes: list[Scope], lease_id: str, reserved: int, used: int,
                     usage: UsageRecord | None) -> None:
        self.state.settle(scopes, lease_id, reserved, used, usage)

    async def settle_many(self, items: list[Settlement]) -> None:
        for item in items:
            self.state.settle(item.scopes, item.lease_id, item.reserved, item.used, item.usage)

    async def admit_many(self, items: list[tuple[list[Scope], str, int]]) -> list[Decision]:
        return [self.state.admit(scopes, lease_id, tokens) for scopes, lease_id, tokens in items]

    async def usage(self, since: float, until: float) -> list[UsageRow]:
        return self.state.usage(since, until)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
