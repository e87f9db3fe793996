"""One suite for both limit stores: the plain-Python state (behind ``MemoryStore``, with a clock
the tests move) and ``RedisStore`` on a real redis-server (real time: limits of 60 per minute
refill one a second, so short sleeps suffice). Passing the same cases is what keeps the Lua
scripts and ``MemoryLimitState`` identical. One test drives ``EmbeddedStore``'s Ray actor.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from rayllm_app.ports import free_port
from rayllm_app.tenancy import (
    CONCURRENT,
    LEASE_S,
    REQUESTS,
    TOKENS,
    MemoryLimitState,
    MemoryStore,
    Scope,
    Settlement,
    UsageRecord,
    UsageRow,
    open_store,
)

T0 = 60 * 28_333_333.0   # the fake clock's start (Nov 2023), on a minute boundary


@pytest.fixture(params=["memory", "redis"])
def run(request):
    """``run(body)`` awaits ``body(store, advance, now)`` in a fresh event loop: ``advance(s)`` lets
    s seconds pass (moves the memory store's clock; sleeps for Redis), ``now()`` is its clock."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def go(body) -> None:
        async def main():
            if url is None:
                clock = [T0]

                async def advance(seconds: float) -> None:
                    clock[0] += seconds
                store, now = MemoryStore(clock=lambda: clock[0]), (lambda: clock[0])
            else:
                from rayllm_app.tenancy.redis_store import RedisStore

                store = RedisStore(url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
                advance, now = asyncio.sleep, time.time
            try:
                await asyncio.wait_for(body(store, advance, now), 20)
            finally:
                await store.close()
        asyncio.run(main())
    return go


def test_requests_trip_exactly_at_the_limit_and_refill(run):
    scope = [Scope("team-a", requests_per_minute=60)]

    async def body(store, advance, now):
        for i in range(60):
            decision = await store.admit(scope, f"l{i}", 0)
            assert decision.allowed, i
        refused = await store.admit(scope, "x", 0)
        assert (refused.allowed, refused.limit, refused.scope) == (False, REQUESTS, "team-a")
        assert 0.5 < refused.retry_after_s <= 1.0
        await advance(refused.retry_after_s + 0.05)
        assert (await store.admit(scope, "y", 0)).allowed
        assert not (await store.admit(scope, "z", 0)).allowed

    run(body)


def test_tokens_trip_within_one_request(run):
    scope = [Scope("team-a", tokens_per_minute=100)]

    async def body(store, advance, now):
        assert (await store.admit(scope, "a", 60)).allowed
        second = await store.admit(scope, "b", 40)
        assert second.allowed and second.remaining_tokens == 0
        refused = await store.admit(scope, "c", 1)
        assert (refused.allowed, refused.limit, refused.too_large) == (False, TOKENS, False)
        assert refused.retry_after_s == pytest.approx(1 / (100 / 60), abs=0.05)

    run(body)


def test_too_large_never_passes_and_consumes_nothing(run):
    scopes = [Scope("team-a", requests_per_minute=1), Scope("team-a|m", tokens_per_minute=100)]

    async def body(store, advance, now):
        refused = await store.admit(scopes, "a", 101)
        assert (refused.allowed, refused.too_large, refused.limit) == (False, True, TOKENS)
        assert refused.scope == "team-a|m" and refused.retry_after_s == 0.0
        assert (await store.admit(scopes, "b", 100)).allowed   # the one request was not spent
        # Another scope also refuses (requests, with a wait): too_large still wins.
        again = await store.admit(scopes, "c", 101)
        assert again.too_large and again.scope == "team-a|m"

    run(body)


def test_settle_refunds_unused_tokens(run):
    scope = [Scope("team-a", tokens_per_minute=100)]

    async def body(store, advance, now):
        assert (await store.admit(scope, "a", 50)).allowed
        await store.settle(scope, "a", reserved=50, used=10, usage=None)
        refunded = await store.admit(scope, "b", 90)   # 50 left + 40 back
        assert refunded.allowed and refunded.remaining_tokens == 0

    run(body)


def test_settle_debt_makes_later_requests_wait(run):
    scope = [Scope("team-a", tokens_per_minute=100)]

    async def body(store, advance, now):
        assert (await store.admit(scope, "a", 0)).allowed
        await store.settle(scope, "a", reserved=0, used=150, usage=None)   # level 100 - 150 = -50
        refused = await store.admit(scope, "b", 0)
        assert (refused.allowed, refused.limit) == (False, TOKENS)
        assert refused.retry_after_s == pytest.approx(50 / (100 / 60), abs=0.1)
        assert refused.remaining_tokens == 0 and refused.reset_tokens_s == pytest.approx(150 * 0.6, abs=0.1)
        await store.settle(scope, "never-admitted", reserved=0, used=0, usage=None)   # not an error

    run(body)


def test_settle_many_is_every_settle_at_once(run):
    scope = [Scope("team-a", tokens_per_minute=100, max_concurrent_requests=2)]

    async def body(store, advance, now):
        assert (await store.admit(scope, "a", 40)).allowed and (await store.admit(scope, "b", 40)).allowed
        assert not (await store.admit(scope, "c", 10)).allowed                # both slots taken
        record = UsageRecord("team-a", "m", 2, 5, 15, 0)
        await store.settle_many([Settlement(scope, "a", 40, 10), Settlement(scope, "b", 40, 10),
                                 Settlement([], "", 0, 0, record)])
        refunded = await store.admit(scope, "c", 80)   # 20 left + 60 back; both slots free again
        assert refunded.allowed and refunded.remaining_tokens == 0
        assert await store.usage(now() - 60, now() + 60) == [UsageRow("team-a", "m", 2, 5, 15, 0)]
        await store.settle_many([])                    # nothing to send is fine

    run(body)


def test_admit_many_decides_in_order(run):
    scope = [Scope("team-a", requests_per_minute=60)]
    other = [Scope("team-b", requests_per_minute=60, max_concurrent_requests=1)]

    async def body(store, advance, now):
        for i in range(58):
            assert (await store.admit(scope, f"a{i}", 0)).allowed
        decisions = await store.admit_many([(scope, "x", 0), (other, "y", 0), (scope, "z", 0), (scope, "w", 0),
                                            (other, "v", 0)])
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert decisions[2].remaining_requests == 0 and decisions[3].limit == REQUESTS
        assert decisions[4].limit == CONCURRENT          # y holds team-b's one slot
        assert await store.admit_many([]) == []

    run(body)


def test_concurrency_cap_and_release_on_settle(run):
    scope = [Scope("team-a", max_concurrent_requests=2)]

    async def body(store, advance, now):
        assert (await store.admit(scope, "a", 0)).allowed
        assert (await store.admit(scope, "b", 0)).allowed
        refused = await store.admit(scope, "c", 0)
        assert (refused.allowed, refused.limit, refused.retry_after_s) == (False, CONCURRENT, 1.0)
        await store.settle(scope, "a", reserved=0, used=0, usage=None)
        assert (await store.admit(scope, "c", 0)).allowed
        assert not (await store.admit(scope, "d", 0)).allowed

    run(body)


def test_all_or_nothing_across_scopes(run):
    key = Scope("team-a", requests_per_minute=10, tokens_per_minute=1000, max_concurrent_requests=5)
    model = Scope("team-a|model-x", requests_per_minute=1)

    async def body(store, advance, now):
        first = await store.admit([key, model], "a", 100)
        assert first.allowed and (first.remaining_requests, first.remaining_tokens) == (9, 900)
        refused = await store.admit([key, model], "b", 100)
        assert (refused.allowed, refused.limit, refused.scope) == (False, REQUESTS, "team-a|model-x")
        # As things stand: the key-wide buckets did not pay for the refused request.
        assert (refused.remaining_requests, refused.remaining_tokens) == (9, 900)
        alone = await store.admit([key], "c", 100)
        assert alone.allowed and (alone.remaining_requests, alone.remaining_tokens) == (8, 800)
        # The refused lease took no concurrency slot: 2 held (a, c), 3 more fit.
        for lease in "def":
            assert (await store.admit([key], lease, 0)).allowed, lease
        assert (await store.admit([key], "g", 0)).limit == CONCURRENT

    run(body)


def test_longest_wait_is_reported(run):
    key = Scope("team-a", requests_per_minute=60)             # empty: 1 s to the next request
    model = Scope("team-a|m", tokens_per_minute=60)           # 1 token a second

    async def body(store, advance, now):
        for i in range(60):
            assert (await store.admit([key], f"l{i}", 0)).allowed
        refused = await store.admit([key, model], "x", 0)
        assert (refused.limit, refused.scope) == (REQUESTS, "team-a")
        assert (await store.admit([model], "y", 50)).allowed   # 10 tokens left: 30 need 20 s
        refused = await store.admit([key, model], "z", 30)
        assert (refused.limit, refused.scope) == (TOKENS, "team-a|m")
        assert refused.retry_after_s == pytest.approx(20.0, abs=0.1)

    run(body)


def test_header_values(run):
    key = Scope("team-a", requests_per_minute=60)
    model = Scope("team-a|m", requests_per_minute=600, tokens_per_minute=100)

    async def body(store, advance, now):
        decision = await store.admit([key, model], "a", 30)
        assert decision.allowed
        # Requests from the first scope with the limit (the key), tokens from the model scope.
        assert (decision.limit_requests, decision.remaining_requests) == (60, 59)
        assert decision.reset_requests_s == pytest.approx(1.0, abs=0.05)
        assert (decision.limit_tokens, decision.remaining_tokens) == (100, 70)
        assert decision.reset_tokens_s == pytest.approx(30 * 0.6, abs=0.05)
        bare = await store.admit([Scope("team-b")], "b", 10**9)
        assert bare.allowed and bare.limit_requests is None and bare.remaining_tokens is None
        assert bare.reset_requests_s is None and bare.reset_tokens_s is None

    run(body)


def test_usage_rows_are_summed_over_the_window(run):
    async def body(store, advance, now):
        scope = [Scope("team-a")]
        records = [UsageRecord("team-a", "m1", prompt_tokens=10, completion_tokens=5),
                   UsageRecord("team-a", "m1", prompt_tokens=3, completion_tokens=0, errors=1),
                   UsageRecord("team-a", "m0", prompt_tokens=7, completion_tokens=1),
                   UsageRecord("b\nkey:with|odd chars", "org/model:v1", requests=2, prompt_tokens=1)]
        for i, record in enumerate(records):
            await store.settle(scope, f"l{i}", 0, 0, record)
        t = now()
        expected = [UsageRow("b\nkey:with|odd chars", "org/model:v1", 2, 1, 0, 0),
                    UsageRow("team-a", "m0", 1, 7, 1, 0), UsageRow("team-a", "m1", 2, 13, 5, 1)]
        assert await store.usage(t - 60, t + 60) == expected
        assert await store.usage(t - 7200, t - 3600) == []
        assert await store.usage(t + 120, t + 7200) == []

    run(body)


def test_usage_window_by_minute_with_moving_clock():
    """Memory only: records in different minutes fall in or out of a window by their minute."""
    clock = [T0 + 30]
    state = MemoryLimitState(clock=lambda: clock[0])
    state.settle([], "a", 0, 0, UsageRecord("k", "m", prompt_tokens=1))
    clock[0] = T0 + 600
    state.settle([], "b", 0, 0, UsageRecord("k", "m", prompt_tokens=2))
    assert state.usage(T0 + 59, T0 + 60) == [UsageRow("k", "m", 1, 1, 0, 0)]   # since floors to T0
    assert state.usage(T0 + 60, T0 + 3600) == [UsageRow("k", "m", 1, 2, 0, 0)]
    assert state.usage(T0, T0 + 600) == [UsageRow("k", "m", 2, 3, 0, 0)]
    clock[0] = T0 + 9 * 86400   # past the retention: the old minutes go on the next write
    state.settle([], "c", 0, 0, UsageRecord("k", "m", prompt_tokens=4))
    assert state.usage(T0, clock[0]) == [UsageRow("k", "m", 1, 4, 0, 0)]


def test_stale_concurrency_lease_is_forgotten():
    """Memory only: a slot whose router died frees itself after LEASE_S."""
    clock = [T0]
    state = MemoryLimitState(clock=lambda: clock[0])
    scope = [Scope("k", max_concurrent_requests=1)]
    assert state.admit(scope, "dead-router", 0).allowed
    clock[0] += LEASE_S - 1
    assert not state.admit(scope, "b", 0).allowed
    clock[0] += 2
    assert state.admit(scope, "b", 0).allowed


def test_redis_store_on_a_wrong_port_fails_ping_quickly():
    from redis.exceptions import ConnectionError as RedisConnectionError

    from rayllm_app.tenancy.redis_store import RedisStore

    async def main():
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
        try:
            with pytest.raises(RedisConnectionError):
                await store.ping()
        finally:
            await store.close()
    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 3


def test_open_store_picks_the_store_from_the_url():
    from rayllm_app.tenancy.embedded_store import EmbeddedStore
    from rayllm_app.tenancy.redis_store import RedisStore

    assert isinstance(open_store(None), EmbeddedStore) and isinstance(open_store("embedded"), EmbeddedStore)
    for url in ("redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1", "unix:///run/redis.sock"):
        store = open_store(url, prefix="p:")
        assert isinstance(store, RedisStore) and store.prefix == "p:"
        asyncio.run(store.close())
    with pytest.raises(ValueError, match="redis://.*rediss://.*unix://"):
        open_store("memcached://127.0.0.1:11211")


def test_embedded_store_shares_one_ray_actor():
    """Two stores (two routers) reach the same detached actor by name; one killed for good is
    created anew on the call after the one that failed."""
    import ray

    from rayllm_app.tenancy.embedded_store import EmbeddedStore

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    name = f"rayllm-limits-test-{uuid.uuid4().hex[:8]}"
    scope = [Scope("team-a", requests_per_minute=1, max_concurrent_requests=5)]

    async def main():
        first, second = EmbeddedStore(name=name), EmbeddedStore(name=name)
        await first.ping()
        assert (await first.admit(scope, "a", 0)).allowed
        refused = await second.admit(scope, "b", 0)
        assert (refused.allowed, refused.limit, refused.scope) == (False, REQUESTS, "team-a")
        await second.settle(scope, "a", 0, 0, UsageRecord("team-a", "m", prompt_tokens=4))
        assert await first.usage(time.time() - 60, time.time() + 60) == [UsageRow("team-a", "m", 1, 4, 0, 0)]
        ray.kill(ray.get_actor(name, namespace="rayllm"), no_restart=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # ray.kill is asynchronous: wait until the actor is gone
            try:
                ray.get_actor(name, namespace="rayllm")
            except ValueError:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(ray.exceptions.RayActorError):
            await first.admit(scope, "c", 0)
        assert (await first.admit(scope, "c", 0)).allowed   # a new actor: fresh buckets
        await first.close()
        await second.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        if started:
            ray.shutdown()
        else:
            try:
                ray.kill(ray.get_actor(name, namespace="rayllm"))
            except ValueError:  # gone already
                pass
