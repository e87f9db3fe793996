"""Far from a budget's edge, admit without waiting for the store.

A store round trip per request (a Ray actor call, or a Redis script) sits on the request's
path: at c=64 on a 2-core host it added 40-120 ms of TTFT. Yet a key far below its limits
gets the same answer every time. So the router keeps, per scope, what the store last said
was left (refreshed by every answer, at least every ``SNAPSHOT_TTL_S`` under load) minus
what it admitted since; while that leaves ``FAST_MARGIN`` requests' worth of headroom per
router replica, it admits at once and tells the store in the background. The store stays the
one count of record; near a limit (or with a per-model scope, whose headroom no answer
reports) every request waits for the store's decision, so limits trip exactly as before.

What it can cost: a background admit the store refuses (other routers used the headroom
within one round trip) lets that request run over budget; it is then charged what it used,
as debt. The margin makes that need many routers at full speed against one key at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rayllm_app.router.ratelimit_headers import headers_of
from rayllm_app.tenancy.state import Decision, Scope

FAST_MARGIN = 20        # requests of headroom per router replica, below which the store decides
SNAPSHOT_TTL_S = 1.0    # an older view of a scope is not trusted


@dataclass
class _View:
    at: float
    remaining_requests: int | None
    remaining_tokens: int | None
    spent_requests: int = 0
    spent_tokens: int = 0


class Headroom:
    def __init__(self, routers: int, clock=time.monotonic) -> None:
        self.routers = max(routers, 1)  # kept current by the router's status tracker (set_routers)
        self._views: dict[str, _View] = {}
        self._inflight: dict[str, int] = {}
        self._clock = clock

    def set_routers(self, routers: int) -> None:
        """The router replicas now running: each admits locally only within its share."""
        self.routers = max(routers, 1)

    def admit_locally(self, scopes: list[Scope], tokens: int) -> dict[str, str] | None:
        """Rate-limit headers if this request may go without waiting for the store, else None."""
        if len(scopes) != 1:
            return None
        scope = scopes[0]
        view = self._views.get(scope.name)
        if view is None or self._clock() - view.at > SNAPSHOT_TTL_S:
            return None
        margin = FAST_MARGIN * self.routers
        requests_left = tokens_left = None
        if scope.requests_per_minute is not None:
            if view.remaining_requests is None:
                return None
            requests_left = view.remaining_requests - view.spent_requests - 1
            if requests_left < margin:
                return None
        if scope.tokens_per_minute is not None:
            if view.remaining_tokens is None:
                return None
            tokens_left = view.remaining_tokens - view.spent_tokens - tokens
            if tokens_left < margin * max(tokens, 1):
                return None
        if self.near_concurrency_limit(scopes):
            return None
        view.spent_requests += 1
        view.spent_tokens += tokens
        return _headers(scope, requests_left, tokens_left)

    def near_concurrency_limit(self, scopes: list[Scope]) -> bool:
        """Would one more request of this router take a scope past half its concurrency share?"""
        return any(scope.max_concurrent_requests is not None and
                   (self._inflight.get(scope.name, 0) + 1) * 2 * self.routers > scope.max_concurrent_requests
                   for scope in scopes)

    def saw(self, scopes: list[Scope], decision: Decision) -> None:
        """The store's answer for these scopes: what is left now."""
        if len(scopes) == 1:
            self._views[scopes[0].name] = _View(self._clock(), decision.remaining_requests, decision.remaining_tokens)

    def started(self, scopes: list[Scope]) -> None:
        for scope in scopes:
            self._inflight[scope.name] = self._inflight.get(scope.name, 0) + 1

    def ended(self, scopes: list[Scope]) -> None:
        for scope in scopes:
            left = self._inflight.get(scope.name, 0) - 1
            if left > 0:
                self._inflight[scope.name] = left
            else:
                self._inflight.pop(scope.name, None)


def _headers(scope: Scope, requests_left: int | None, tokens_left: int | None) -> dict[str, str]:
    rows = []
    for kind, limit, left in (("requests", scope.requests_per_minute, requests_left),
                              ("tokens", scope.tokens_per_minute, tokens_left)):
        if limit is not None and left is not None:
            rows.append((kind, limit, left, max(limit - left, 0) * 60 / limit))  # refill at limit/60 per s
    return headers_of(rows)
