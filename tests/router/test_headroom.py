"""Admitting ahead of the store far from a budget's edge (router/headroom.py): the store still
counts every request, limits near their edge are decided by the store alone."""

from __future__ import annotations

import asyncio

from rayllm_app.replica.http_forward import Usage
from rayllm_app.router.headroom import FAST_MARGIN, Headroom
from rayllm_app.tenancy.state import Decision, Scope
from tests.router.test_budgets import admit, key, make_budgets, metrics  # noqa: F401 (autouse fixture)


def test_local_admission_needs_a_fresh_view_and_headroom():
    now = [0.0]
    headroom = Headroom(routers=2, clock=lambda: now[0])
    scope = [Scope("k", requests_per_minute=1000, tokens_per_minute=10**6)]
    assert headroom.admit_locally(scope, 10) is None                    # no view yet
    headroom.saw(scope, Decision(True, remaining_requests=FAST_MARGIN * 2 + 2, remaining_tokens=10**6))
    granted = [headroom.admit_locally(scope, 10) for _ in range(5)]
    assert all(granted[:2]) and granted[2:] == [None, None, None]       # down to the margin: the store decides
    assert granted[0]["x-ratelimit-limit-requests"] == "1000"
    assert granted[0]["x-ratelimit-remaining-requests"] == str(FAST_MARGIN * 2 + 1)
    headroom.saw(scope, Decision(True, remaining_requests=900, remaining_tokens=10**6))
    now[0] += 5                                                         # the view is stale
    assert headroom.admit_locally(scope, 10) is None
    two = [Scope("k", requests_per_minute=1000), Scope("k|m", requests_per_minute=1000)]
    headroom.saw(two, Decision(True, remaining_requests=900))
    assert headroom.admit_locally(two, 10) is None                      # a model scope: always the store


def test_concurrency_headroom_counts_this_routers_requests():
    headroom = Headroom(routers=1)
    scope = [Scope("k", max_concurrent_requests=8)]
    headroom.saw(scope, Decision(True))
    for _ in range(4):
        assert headroom.admit_locally(scope, 0) is not None
        headroom.started(scope)
    assert headroom.admit_locally(scope, 0) is None                     # half the slots: the store decides
    headroom.ended(scope)
    assert headroom.admit_locally(scope, 0) is not None


def test_budgets_count_locally_admitted_requests_in_the_store():
    async def main() -> None:
        budgets, _ = make_budgets()
        team = key(requests_per_minute=10_000, tokens_per_minute=10**8)
        first = await admit(budgets, team)             # decided by the store: fills the view
        assert first.counted is None
        second = await admit(budgets, team)            # far from the limits: admitted at once
        assert second.counted is not None and second.headers["x-ratelimit-limit-requests"] == "10000"
        assert await second.counted                    # ... and counted by the store
        for admission in (first, second):
            budgets.settle(admission, Usage(3, 4), 200)
        await budgets.settled()
        decision = await budgets.store.admit([first.scopes[0]], "probe", 0)
        assert decision.remaining_requests == 10_000 - 3      # both requests and the probe
        tight = key("tight", requests_per_minute=12)
        for _ in range(12):
            assert (await admit(budgets, tight)).counted is None   # near the edge: never ahead of the store
        await budgets.close()

    asyncio.run(main())


def test_a_concurrency_slot_frees_without_waiting_for_the_batch():
    async def main() -> None:
        budgets, _ = make_budgets()
        team = key(max_concurrent_requests=2)
        first, second = await admit(budgets, team), await admit(budgets, team)
        budgets.settle(first, Usage(1, 1), 200)
        await asyncio.sleep(0.005)                     # far less than a batch (50 ms)
        third = await admit(budgets, team)             # the slot is free already
        for admission in (second, third):
            budgets.settle(admission, Usage(1, 1), 200)
        await budgets.close()

    asyncio.run(main())
