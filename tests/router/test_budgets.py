"""Per-key budgets on the router (rayllm_app.router.budgets), without Ray or a network:
``Budgets`` over the in-process ``MemoryStore`` with a clock the tests move, so refills and
``Retry-After`` values are exact. The stores themselves have their own suite (tests/tenancy).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from rayllm_app.config.key_config import PRIORITY_VALUES, KeyLimits
from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.errors import OverloadedError
from rayllm_app.replica.http_forward import Usage
from rayllm_app.router import budgets as budgets_module
from rayllm_app.router.auth import ApiKey, parse_key_file
from rayllm_app.router.budgets import (
    BYTES_PER_PROMPT_TOKEN,
    Budgets,
    LimitStoreUnavailableError,
    RateLimitError,
    format_reset,
    requested_tokens,
    scopes_of,
    with_priority,
)
from rayllm_app.tenancy.state import MemoryStore, Scope, UsageRow

T0 = 60 * 28_333_333.0  # the fake clock's start, on a minute boundary
CHAT = "/v1/chat/completions"
MODEL = "tiny-chat"


@pytest.fixture(autouse=True)
def metrics(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Ray metrics replaced by a list of the calls (no Ray here); tests may read it."""
    calls: list[tuple] = []
    monkeypatch.setattr(budgets_module, "record_key_usage", lambda *args: calls.append(("usage", *args)))
    monkeypatch.setattr(budgets_module, "record_rate_limited", lambda *args: calls.append(("limited", *args)))
    return calls


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make_budgets(store=None, **settings) -> tuple[Budgets, Clock]:
    clock = Clock()
    return Budgets(RouterSettings(**settings), store=store or MemoryStore(clock=clock)), clock


def key(name: str = "team-a", *, priority: str = "normal", model_limits: dict | None = None, **limits) -> ApiKey:
    return ApiKey(name=name, digest=name.encode(), models=None, priority=priority, limits=KeyLimits(**limits),
                  model_limits=tuple((m, KeyLimits(**v)) for m, v in (model_limits or {}).items()))


def body(max_tokens: int | None = None, *, pad: int = 0, **extra) -> tuple[bytes, dict]:
    data = {"model": MODEL, "messages": [{"role": "user", "content": "x" * pad}], **extra}
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    return json.dumps(data).encode(), data


async def admit(budgets: Budgets, api_key: ApiKey | None, max_tokens: int | None = 10, *, model: str = MODEL,
                path: str = CHAT, capacity: int | None = None, default_max_tokens: int | None = None, **extra):
    raw, data = body(max_tokens, **extra)
    return await budgets.admit(api_key, model, path, raw, data, capacity=capacity,
                               default_max_tokens=default_max_tokens)


async def drain(budgets: Budgets) -> None:
    """Wait for the background store settles ``settle`` started."""
    await budgets.settled()


def run(coro_fn):
    """Run an async test body with a fresh loop; the Budgets' flusher is cancelled by close()."""
    return asyncio.run(asyncio.wait_for(coro_fn(), 10))


# --------------------------------------------------------------------------- admit and headers

def test_admit_within_limits_returns_rate_limit_headers():
    async def main():
        budgets, _ = make_budgets()
        admission = await admit(budgets, key(requests_per_minute=10, tokens_per_minute=6000), max_tokens=100)
        raw, _ = body(100)
        assert admission.reserved == len(raw) // BYTES_PER_PROMPT_TOKEN + 100
        remaining_tokens = 6000 - admission.reserved
        assert admission.headers == {
            "x-ratelimit-limit-requests": "10",
            "x-ratelimit-remaining-requests": "9",
            "x-ratelimit-reset-requests": "6s",   # one request of 10/min refills in 6 s
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-tokens": str(remaining_tokens),
            "x-ratelimit-reset-tokens": format_reset(admission.reserved / 100),  # 6000/min = 100/s
        }
        assert budgets.inflight[MODEL] == 1
        await budgets.close()
    run(main)


def test_key_without_limits_or_anonymous_is_admitted_without_headers():
    async def main():
        budgets, _ = make_budgets()
        for caller in (None, key()):
            for _ in range(50):
                admission = await admit(budgets, caller)
                assert admission.headers == {} and admission.scopes == []
        assert budgets.inflight[MODEL] == 100
        assert (await admit(budgets, None)).key == "anonymous"
        await budgets.close()
    run(main)


def test_requests_limit_refuses_the_next_request_with_429_and_retry_after(metrics):
    async def main():
        budgets, clock = make_budgets()
        team = key(requests_per_minute=3)
        for _ in range(3):
            await admit(budgets, team)
        with pytest.raises(RateLimitError) as refused:
            await admit(budgets, team)
        error = refused.value
        assert error.status_code == 429
        assert error.error_type == "requests"
        assert error.code == "rate_limit_exceeded"
        assert error.headers["Retry-After"] == "20"   # 3/min: one request refills in 20 s
        assert error.headers["x-ratelimit-remaining-requests"] == "0"
        assert error.headers["x-ratelimit-limit-requests"] == "3"
        assert "Rate limit reached for key 'team-a' on requests per minute" in error.message
        assert "try again in 20s" in error.message
        assert ("limited", "team-a", MODEL, "requests_per_minute") in metrics
        assert budgets.inflight[MODEL] == 3   # the refused request holds no slot
        clock.now += 19.0
        with pytest.raises(RateLimitError):
            await admit(budgets, team)
        clock.now += 1.0
        assert (await admit(budgets, team)).headers["x-ratelimit-remaining-requests"] == "0"
        await budgets.close()
    run(main)


# --------------------------------------------------------------------------- token estimate

def test_requested_tokens_estimate():
    raw = b"x" * 401
    assert requested_tokens(raw, {"max_tokens": 100}, CHAT, None) == 100 + 100
    assert requested_tokens(raw, {"max_tokens": 100, "n": 3}, CHAT, None) == 100 + 300
    assert requested_tokens(raw, {"max_completion_tokens": 7}, CHAT, 64) == 100 + 7
    assert requested_tokens(raw, {"max_output_tokens": 9}, "/v1/responses", 64) == 100 + 9
    # absent: the model's default max_tokens; no default either: the prompt only
    assert requested_tokens(raw, {}, "/v1/completions", 64) == 100 + 64
    assert requested_tokens(raw, {}, "/v1/completions", None) == 100
    # not numbers: ignored (a bool is not a count), the default applies
    assert requested_tokens(raw, {"max_tokens": True, "n": True}, CHAT, 5) == 100 + 5
    assert requested_tokens(raw, {"max_tokens": "50"}, CHAT, 5) == 100 + 5
    assert requested_tokens(raw, {"max_tokens": -3}, CHAT, 5) == 100
    # paths that reach no engine reserve nothing
    for path in ("/tokenize", "/detokenize", "/v1/messages/count_tokens"):
        assert requested_tokens(raw, {"max_tokens": 100}, path, 64) == 0


def test_admit_reserves_the_estimate_and_tokenize_reserves_nothing():
    async def main():
        budgets, _ = make_budgets()
        team = key(tokens_per_minute=10_000)
        raw, data = body(None)
        admission = await budgets.admit(team, MODEL, CHAT, raw, data, capacity=None, default_max_tokens=256)
        assert admission.reserved == len(raw) // 4 + 256   # the model default, max_tokens being absent
        tokenize = await budgets.admit(team, MODEL, "/tokenize", raw, data, capacity=None, default_max_tokens=256)
        assert tokenize.reserved == 0
        assert tokenize.headers["x-ratelimit-remaining-tokens"] == str(10_000 - admission.reserved)
        await budgets.close()
    run(main)


# --------------------------------------------------------------------------- settle

def test_settle_with_usage_refunds_the_unused_reservation():
    async def main():
        budgets, _ = make_budgets()
        team = key(tokens_per_minute=1000)
        first = await admit(budgets, team, max_tokens=800)
        assert first.reserved > 800
        # the bucket holds less than one more such request until the first one settles
        with pytest.raises(RateLimitError) as refused:
            await admit(budgets, team, max_tokens=800)
        assert refused.value.error_type == "tokens"
        assert "on tokens per minute" in refused.value.message
        budgets.settle(first, Usage(prompt_tokens=10, completion_tokens=20), 200)
        await drain(budgets)
        second = await admit(budgets, team, max_tokens=800)
        assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 30 - second.reserved)
        await budgets.close()
    run(main)


def test_settle_without_usage_charges_the_whole_reservation():
    async def main():
        budgets, _ = make_budgets()
        team = key(tokens_per_minute=1000)
        first = await admit(budgets, team, max_tokens=600)
        budgets.settle(first, None, 499)   # cut short without a count
        await drain(budgets)
        with pytest.raises(RateLimitError) as refused:
            await admit(budgets, team, max_tokens=600)
        assert refused.value.error_type == "tokens"
        assert refused.value.headers["x-ratelimit-remaining-tokens"] == str(1000 - first.reserved)
        await budgets.close()
    run(main)


def test_settle_twice_counts_once():
    async def main():
        budgets, _ = make_budgets()
        admission = await admit(budgets, key(max_concurrent_requests=1))
        budgets.settle(admission, Usage(1, 1), 200)
        budgets.settle(admission, Usage(1, 1), 200)
        assert budgets.inflight[MODEL] == 0
        await budgets.flush_usage()
        rows = await budgets.store.usage(T0 - 60, T0 + 60)
        assert [row.requests for row in rows] == [1]
        await budgets.close()
    run(main)


def test_request_larger_than_the_tokens_limit_is_refused_as_too_large():
    async def main():
        budgets, _ = make_budgets()
        with pytest.raises(RateLimitError) as refused:
            await admit(budgets, key(tokens_per_minute=100), max_tokens=500)
        error = refused.value
        raw, _ = body(500)
        assert error.status_code == 429 and error.error_type == "tokens"
        assert error.message.startswith("Request too large for key 'team-a' on tokens per minute: limit 100, "
                                        f"requested {len(raw) // 4 + 500}")
        assert "Lower max_tokens" in error.message
        assert "Retry-After" not in error.headers   # waiting never helps
        await budgets.close()
    run(main)


def test_too_large_on_a_model_names_the_models_tokens_limit():
    async def main():
        budgets, _ = make_budgets()
        team = key(tokens_per_minute=100_000, model_limits={MODEL: {"tokens_per_minute": 100}})
        with pytest.raises(RateLimitError) as refused:
            await admit(budgets, team, max_tokens=500)
        assert "on model 'tiny-chat'" in refused.value.message
        assert "limit 100," in refused.value.message
        await budgets.close()
    run(main)


# --------------------------------------------------------------------------- scopes

def test_scopes_of_key_then_model():
    team = key(requests_per_minute=100, model_limits={"small": {"requests_per_minute": 1}, "big": {}})
    assert scopes_of(team, "small") == [Scope("team-a", requests_per_minute=100),
                                        Scope("team-a|small", requests_per_minute=1)]
    assert scopes_of(team, "big") == [Scope("team-a", requests_per_minute=100)]   # an empty entry adds nothing
    assert scopes_of(key(), "small") == []
    only_model = key(model_limits={"small": {"max_concurrent_requests": 2}})
    assert scopes_of(only_model, "other") == []
    assert scopes_of(only_model, "small") == [Scope("team-a|small", max_concurrent_requests=2)]


def test_model_limit_refuses_while_the_key_wide_scope_passes():
    async def main():
        budgets, _ = make_budgets()
        team = key(requests_per_minute=100, model_limits={"small": {"requests_per_minute": 1}})
        first = await admit(budgets, team, model="small")
        assert first.headers["x-ratelimit-limit-requests"] == "100"   # headers report the key-wide scope
        with pytest.raises(RateLimitError) as refused:
            await admit(budgets, team, model="small")
        assert "key 'team-a' on model 'small'" in refused.value.message
        assert refused.value.headers["Retry-After"] == "60"
        other = await admit(budgets, team, model="big")   # the key itself still has budget
        assert other.headers["x-ratelimit-remaining-requests"] == "98"
        await budgets.close()
    run(main)


# --------------------------------------------------------------------------- concurrency

def test_concurrency_limit_and_release_on_settle():
    async def main():
        budgets, _ = make_budgets()
        team = key(max_concurrent_requests=2)
        running = [await admit(budgets, team) for _ in range(2)]
        with pytest.raises(RateLimitError) as refused:
            await admit(budgets, team)
        assert refused.value.status_code == 429
        assert refused.value.error_type == "requests"
        assert refused.value.headers["Retry-After"] == "1"
        assert refused.value.message.startswith("Too many concurrent requests for key 'team-a'.")
        budgets.settle(running[0], Usage(1, 1), 200)
        await drain(budgets)
        third = await admit(budgets, team)
        with pytest.raises(RateLimitError):
            await admit(budgets, team)
        # an error ends the request too: its slot frees the same way
        budgets.settle(third, None, 500)
        await drain(budgets)
        await admit(budgets, team)
        await budgets.close()
    run(main)


# --------------------------------------------------------------------------- priority

def test_low_priority_is_refused_first_when_the_model_is_at_capacity(metrics):
    async def main():
        budgets, _ = make_budgets()
        low, normal = key("batch", priority="low"), key("chat")
        running = [await admit(budgets, normal, capacity=2) for _ in range(2)]
        with pytest.raises(OverloadedError) as refused:
            await admit(budgets, low, capacity=2)
        assert refused.value.status_code == 429
        assert refused.value.code == "overloaded"
        assert refused.value.headers["Retry-After"] == "2"
        assert "low-priority" in refused.value.message
        assert ("limited", "batch", MODEL, "priority") in metrics
        # a normal key (and an anonymous caller) still gets in: Serve queues it
        await admit(budgets, normal, capacity=2)
        await admit(budgets, None, capacity=2)
        # capacity unknown (no running replica counted): nobody is shed
        await admit(budgets, low, capacity=None)
        # below capacity again: the low-priority key is admitted
        for admission in running:
            budgets.settle(admission, Usage(1, 1), 200)
        assert budgets.inflight[MODEL] == 3
        with pytest.raises(OverloadedError):
            await admit(budgets, low, capacity=3)
        await admit(budgets, low, capacity=4)
        await budgets.close()
    run(main)


def test_with_priority_overrides_the_clients_priority():
    raw = json.dumps({"model": MODEL, "priority": -100, "messages": []}).encode() + b"\n  "
    out = with_priority(raw, PRIORITY_VALUES["low"])
    assert json.loads(out)["priority"] == PRIORITY_VALUES["low"] == 10
    assert out.endswith(b',"priority":10}')
    assert json.loads(with_priority(b'{"model": "m"}', -10)) == {"model": "m", "priority": -10}


# --------------------------------------------------------------------------- store failures

class FlakyStore(MemoryStore):
    """A MemoryStore that raises (or hangs) while ``down``."""

    def __init__(self, clock, mode: str = "raise") -> None:
        super().__init__(clock=clock)
        self.down = True
        self.mode = mode
        self.settles = 0

    async def _fail(self) -> None:
        if self.mode == "hang":
            await asyncio.sleep(60)
        raise ConnectionError("store down")

    async def admit(self, scopes, lease_id, tokens):
        if self.down:
            await self._fail()
        return await super().admit(scopes, lease_id, tokens)

    async def settle(self, scopes, lease_id, reserved, used, usage):
        self.settles += 1
        if self.down:
            await self._fail()
        return await super().settle(scopes, lease_id, reserved, used, usage)

    async def settle_many(self, items):
        self.settles += sum(1 for item in items if item.scopes)
        if self.down:
            await self._fail()
        return await super().settle_many(items)


def test_store_down_fail_open_admits_without_headers():
    async def main():
        clock = Clock()
        store = FlakyStore(clock)
        budgets = Budgets(RouterSettings(limits_store_failure="open"), store=store)
        team = key(requests_per_minute=1)
        admissions = [await admit(budgets, team) for _ in range(3)]   # over the limit: not enforced
        assert all(a.headers == {} and a.scopes == [] for a in admissions)
        assert budgets.inflight[MODEL] == 3
        for admission in admissions:
            budgets.settle(admission, Usage(2, 3), 200)
        await drain(budgets)
        assert store.settles == 0   # failing open reserved nothing, so nothing is settled
        # the usage history is kept while the store is down, and written once it is back
        await budgets.flush_usage()
        assert await store.usage(T0 - 60, T0 + 60) == []
        store.down = False
        await budgets.flush_usage()
        assert await store.usage(T0 - 60, T0 + 60) == [UsageRow("team-a", MODEL, 3, 6, 9, 0)]
        # and the budget applies again
        await admit(budgets, team)
        with pytest.raises(RateLimitError):
            await admit(budgets, team)
        await budgets.close()
    run(main)


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_store_down_fail_closed_answers_503(mode: str):
    async def main():
        store = FlakyStore(Clock(), mode=mode)
        budgets = Budgets(RouterSettings(limits_store_failure="closed", limits_store_timeout_s=0.05), store=store)
        with pytest.raises(LimitStoreUnavailableError) as refused:
            await admit(budgets, key(requests_per_minute=100))
        assert refused.value.status_code == 503
        assert refused.value.code == "limits_unavailable"
        assert refused.value.headers["Retry-After"] == "5"
        assert budgets.inflight[MODEL] == 0
        # a key without budgets never asks the store
        assert (await admit(budgets, key("free"))).headers == {}
        await budgets.close()
    run(main)


# --------------------------------------------------------------------------- usage history

def test_usage_flush_sums_per_key_and_model():
    async def main():
        budgets, clock = make_budgets()
        team_a, team_b = key("team-a", requests_per_minute=100), key("team-b")
        for caller, model, usage, status in (
                (team_a, "m1", Usage(10, 5), 200),
                (team_a, "m1", Usage(3, 2), 200),
                (team_a, "m1", None, 499),
                (team_a, "m2", Usage(7, 0), 200),
                (team_b, "m2", Usage(1, 1), 500),
                (None, "m1", Usage(2, 2), 200)):
            budgets.settle(await admit(budgets, caller, model=model), usage, status)
        await budgets.flush_usage()
        expected = [UsageRow("anonymous", "m1", 1, 2, 2, 0), UsageRow("team-a", "m1", 3, 13, 7, 1),
                    UsageRow("team-a", "m2", 1, 7, 0, 0), UsageRow("team-b", "m2", 1, 1, 1, 1)]
        assert await budgets.store.usage(T0 - 60, T0 + 60) == expected
        await budgets.flush_usage()   # nothing new: nothing added twice
        assert await budgets.store.usage(T0 - 60, T0 + 60) == expected
        # Budgets.usage flushes first: a request settled since is included
        clock.now += 120
        budgets.settle(await admit(budgets, team_b, model="m2"), Usage(4, 4), 200)
        rows = await budgets.usage(T0 - 60, clock.now)
        assert UsageRow("team-b", "m2", 2, 5, 5, 1) in rows
        # a window after the first minute sees only the later request
        assert await budgets.usage(T0 + 60, clock.now) == [UsageRow("team-b", "m2", 1, 4, 4, 0)]
        await budgets.close()
    run(main)


def test_settle_records_key_usage_metrics(metrics):
    async def main():
        budgets, _ = make_budgets()
        budgets.settle(await admit(budgets, key("team-a")), Usage(11, 22), 200)
        assert ("usage", "team-a", MODEL, 200, 11, 22) in metrics
        await budgets.close()
    run(main)


# --------------------------------------------------------------------------- formatting, key files

@pytest.mark.parametrize("seconds, text", [
    (0.02, "20ms"), (0.0, "0ms"), (-1.0, "0ms"), (0.9994, "999ms"), (1.0, "1s"), (1.5, "1.5s"),
    (12.3456, "12.346s"), (60.0, "1m0s"), (360.0, "6m0s"), (61.4, "1m1s")])
def test_format_reset(seconds: float, text: str):
    assert format_reset(seconds) == text


def test_budgets_from_a_keys_file(tmp_path: Path):
    path = tmp_path / "keys.yaml"
    path.write_text("""
keys:
  - key: sk-a
    name: team-a
    priority: low
    limits: {requests_per_minute: 2}
    model_limits:
      small: {max_concurrent_requests: 1}
""")
    (team,) = parse_key_file(path)

    async def main():
        budgets, _ = make_budgets()
        first = await admit(budgets, team, model="small")
        with pytest.raises(RateLimitError) as refused:   # the model's concurrency slot is taken
            await admit(budgets, team, model="small")
        assert "on model 'small'" in refused.value.message
        await admit(budgets, team, model="big")
        with pytest.raises(RateLimitError) as refused:   # 2 requests per minute across models
            await admit(budgets, team, model="big")
        assert refused.value.error_type == "requests"
        with pytest.raises(OverloadedError):
            await admit(budgets, team, model="big", capacity=1)
        budgets.settle(first, Usage(1, 1), 200)
        await budgets.close()
    run(main)
