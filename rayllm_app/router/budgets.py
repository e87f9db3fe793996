"""Per-key budgets on the router's hot path: admit a request before it is forwarded, settle
it with the tokens the engine counted once it ends.

* **Admit**: the key's buckets (and its buckets on this model) in the shared store
  (rayllm_app.tenancy) must hold one request, its tokens (the prompt, estimated from the
  body, plus the ``max_tokens`` it may generate) and a concurrency slot; else 429 with
  ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers, which successful answers carry too.
* **Settle**: the reservation becomes what the request used (the replica's count), off the
  request's path; a request cut short without a count is charged what it reserved, so
  hanging up early never saves budget.
* **Priority**: a key's priority reaches vLLM's scheduler on models that enable
  ``scheduling_policy: priority``; low-priority requests hold at most a share of a model's
  engine slots and wait for one at the router first (priority_gate), and when the model's
  replicas are full they are refused first, before Serve's queue takes them.
* **Usage**: per key name and model, as Prometheus metrics at once and as a history in the
  store (flushed every few seconds) for ``GET /admin/usage`` and ``rayllm usage``.

When the store cannot be reached, ``limits_store_failure`` decides: ``open`` serves without
budgets (a warning at most every 30 s), ``closed`` answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.errors import OpenAIError, OverloadedError
from rayllm_app.observability.metrics import record_key_usage, record_rate_limited
from rayllm_app.replica.http_forward import Usage
from rayllm_app.router.auth import ApiKey
from rayllm_app.router.headroom import Headroom
from rayllm_app.router.ratelimit_headers import format_reset, rate_limit_headers
from rayllm_app.router.priority_gate import PriorityGate
from rayllm_app.tenancy.state import CONCURRENT, REQUESTS, TOKENS, Decision, Scope, Settlement, UsageRecord
from rayllm_app.tenancy.stores import LimitStore, open_store

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
USAGE_FLUSH_S = 5.0
USAGE_FLUSH_TIMEOUT_S = 10.0
SETTLE_BATCH_S = 0.05  # admits made ahead of the store and settles go out in batches this often
WARN_EVERY_S = 30.0
BYTES_PER_PROMPT_TOKEN = 4  # the body's JSON is larger than its tokens: an upper-leaning guess
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Endpoints whose vLLM request takes a `priority`.
PRIORITY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"})
ENGINE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                          "/v1/embeddings", "/v1/score", "/v1/rerank"})
_LIMIT_WORDS = {REQUESTS: ("requests per minute", "requests"), TOKENS: ("tokens per minute", "tokens"),
                CONCURRENT: ("concurrent requests", "requests")}


class _StoreDown(Exception):
    """The limits store did not answer (see Budgets._store_call)."""


class RateLimitError(OpenAIError):
    """A key's budget refused the request (OpenAI's 429 shape: type names the limit)."""

    status_code = 429
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, limit: str, headers: dict[str, str]) -> None:
        self.error_type = _LIMIT_WORDS.get(limit, ("", "requests"))[1]
        super().__init__(message, headers=headers)


class LimitStoreUnavailableError(OpenAIError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "limits_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(f"Key budgets cannot be checked ({detail}); retry shortly.",
                         headers={"Retry-After": "5"})


def requested_tokens(raw: bytes, data: dict[str, Any], path: str, default_max_tokens: int | None) -> int:
    """What a request may use: its prompt (estimated from the body's size) plus the most it
    may generate. Endpoints that reach no engine (tokenize, count_tokens) reserve nothing."""
    if path not in ENGINE_PATHS:
        return 0
    limit = next((data[name] for name in MAX_TOKEN_FIELDS
                  if isinstance(data.get(name), int) and not isinstance(data.get(name), bool)), None)
    if limit is None:
        limit = default_max_tokens or 0
    n = data.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    return len(raw) // BYTES_PER_PROMPT_TOKEN + max(limit, 0) * choices


def scopes_of(key: ApiKey, model: str) -> list[Scope]:
    """The key's buckets, then its buckets on this model (headers report the first)."""
    scopes = []
    if key.limits.any:
        scopes.append(Scope(key.name, **key.limits.model_dump()))
    model_limits = key.limits_for(model)
    if model_limits is not None and model_limits.any:
        scopes.append(Scope(f"{key.name}|{model}", **model_limits.model_dump()))
    return scopes


def with_priority(raw: bytes, priority: int) -> bytes:
    """The body with ``"priority"`` set last, so it wins over one the client sent (JSON's
    last duplicate key wins in vLLM's parser): a client cannot raise its own priority."""
    body = raw.rstrip()
    return body[:-1] + b',"priority":' + str(priority).encode() + b"}"


@dataclass
class Admission:
    """One admitted request: what it reserved, and the headers its answer carries."""

    key: str
    model: str
    scopes: list[Scope]
    reserved: int
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    headers: dict[str, str] = field(default_factory=dict)
    gated: bool = False   # holds a low-priority slot (priority_gate)
    counted: asyncio.Future | None = None  # admitted ahead of the store: its count there (headroom)
    settled: bool = False


class Budgets:
    """The router's side of key budgets, priorities and usage accounting."""

    def __init__(self, settings: RouterSettings, store: LimitStore | None = None) -> None:
        self.settings = settings
        self._store = store
        self.inflight: Counter[str] = Counter()  # this router's requests per model
        self.gate = PriorityGate()
        self.headroom = Headroom(settings.replicas if isinstance(settings.replicas, int) else 1)
        self._usage: dict[tuple[str, str], list[int]] = {}
        self._settles: list[Settlement] = []
        self._admits: list[Admission] = []   # admitted ahead of the store, not yet sent
        self._scopes: dict[tuple[str, str], list[Scope]] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None
        self._warned_at = 0.0

    @property
    def store(self) -> LimitStore:
        if self._store is None:
            self._store = open_store(self.settings.limits_store)
        return self._store

    async def warm_up(self, timeout_s: float = 60.0) -> None:
        """Reach the store before the first request: creating the embedded store's actor, or
        connecting to Redis, takes longer than one call's timeout (it would fail open)."""
        try:
            await asyncio.wait_for(self.store.ping(), timeout_s)
        except Exception as error:  # noqa: BLE001 - requests will apply limits_store_failure
            logger.warning("Limits store not reachable at start (%s: %s); failing %s until it is",
                           type(error).__name__, error, self.settings.limits_store_failure)

    async def admit(self, key: ApiKey | None, model: str, path: str, raw: bytes, data: dict[str, Any],
                    *, capacity: int | None, default_max_tokens: int | None,
                    low_slots: int | None = None) -> Admission:
        """Count the request against its key's budgets, or raise 429 (or 503, store closed).

        ``capacity``: what the model's replicas take before Serve queues (this router's share);
        ``low_slots``: the engine slots low-priority requests may hold (see priority_gate)."""
        name = key.name if key is not None else ANONYMOUS
        low = key is not None and key.priority == "low"
        if low and capacity is not None and self.inflight[model] + self.gate.waiting(model) >= capacity:
            record_rate_limited(name, model, "priority")
            raise OverloadedError(f"Model '{model}' is at capacity; low-priority requests are refused "
                                  "first. Retry shortly.", retry_after_s=2)
        scopes = self._scopes_of(key, model) if key is not None else []
        admission = Admission(name, model, scopes, requested_tokens(raw, data, path, default_max_tokens))
        if low and low_slots is not None:
            try:
                await self.gate.enter(model, low_slots, self.settings.low_priority_wait_s)
            except OverloadedError:
                record_rate_limited(name, model, "priority")
                raise
            admission.gated = True
        try:
            await self._check_budgets(admission, scopes)
        except BaseException:
            if admission.gated:
                self.gate.leave(model)
            raise
        self.inflight[model] += 1
        return admission

    def _scopes_of(self, key: ApiKey, model: str) -> list[Scope]:
        """scopes_of, built once per key and model (keys do not change while a router runs)."""
        scopes = self._scopes.get((key.name, model))
        if scopes is None:
            scopes = self._scopes[(key.name, model)] = scopes_of(key, model)
        return scopes

    async def _check_budgets(self, admission: Admission, scopes: list[Scope]) -> None:
        name, model = admission.key, admission.model
        if scopes and (local := self.headroom.admit_locally(scopes, admission.reserved)) is not None:
            admission.headers = local  # far from every limit: the store learns of it in the background
            admission.counted = asyncio.get_running_loop().create_future()
            self._admits.append(admission)  # counted in the store with the next batch
            self._schedule_flush()
            self.headroom.started(scopes)
            return
        if scopes:
            try:
                decision = await self._store_call(self.store.admit(scopes, admission.lease_id, admission.reserved))
            except _StoreDown:
                if self.settings.limits_store_failure == "closed":
                    raise LimitStoreUnavailableError("the limits store is unreachable") from None
                decision = None
                admission.scopes = []  # failing open: nothing to settle
            if decision is not None:
                self.headroom.saw(scopes, decision)
            if decision is not None and not decision.allowed:
                record_rate_limited(name, model, decision.limit or "")
                raise self._refusal(name, model, admission.reserved, decision, scopes)
            if decision is not None:
                admission.headers = rate_limit_headers(decision)
                self.headroom.started(scopes)

    async def _count_admitted(self, batch: list[Admission]) -> None:
        """The store's count of requests admitted ahead of it, in one call; each admission's
        ``counted`` says whether the store counted it (refused: other routers spent the
        headroom meanwhile; or the store is unreachable)."""
        try:
            decisions = await self._store_call(self.store.admit_many(
                [(a.scopes, a.lease_id, a.reserved) for a in batch]))
        except _StoreDown:
            decisions = [None] * len(batch)
        for admission, decision in zip(batch, decisions):
            if decision is not None:
                self.headroom.saw(admission.scopes, decision)
                if not decision.allowed:
                    logger.info("Key '%s' went over its %s on '%s' by a request admitted ahead of the store",
                                admission.key, decision.limit, admission.model)
            admission.counted.set_result(decision is not None and decision.allowed)

    def settle(self, admission: Admission, usage: Usage | None, status: int) -> None:
        """The request ended: record its usage now, and settle its reservation in the store
        in the background (never on the answer's path)."""
        if admission.settled:
            return
        admission.settled = True
        self.inflight[admission.model] -= 1
        if admission.gated:
            self.gate.leave(admission.model)
        used = usage.total_tokens if usage is not None else admission.reserved
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        record_key_usage(admission.key, admission.model, status, prompt, completion)
        totals = self._usage.setdefault((admission.key, admission.model), [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += prompt
        totals[2] += completion
        totals[3] += status >= 400
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_every(USAGE_FLUSH_S))
        if admission.scopes:
            self.headroom.ended(admission.scopes)
        if any(scope.tokens_per_minute or scope.max_concurrent_requests for scope in admission.scopes):
            if admission.counted is not None and not admission.counted.done():
                admission.counted.add_done_callback(lambda _: self._queue_settle(admission, used))
            else:
                self._queue_settle(admission, used)

    def _queue_settle(self, admission: Admission, used: int) -> None:
        """Batched: one store call per SETTLE_BATCH_S for every request that ended in it. A
        request the store never counted settles nothing it reserved, only what it used."""
        counted = admission.counted
        reserved = admission.reserved
        if counted is not None and (counted.cancelled() or counted.exception() is not None or not counted.result()):
            reserved = 0
        settlement = Settlement(admission.scopes, admission.lease_id, reserved, used)
        if self.headroom.near_concurrency_limit(admission.scopes):
            # Near a concurrency limit a slot frees at once: a client that sends its next
            # request as soon as this one ended must find it free, not wait for the batch.
            self._spawn(self.store.settle_many([settlement]))
            return
        self._settles.append(settlement)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(SETTLE_BATCH_S, self._flush_settles)

    def _flush_settles(self) -> None:
        """Send what waited for the batch: admits made ahead of the store, then settles."""
        self._flush_scheduled = False
        admits, self._admits = self._admits, []
        if admits:
            task = asyncio.ensure_future(self._count_admitted(admits))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        batch, self._settles = self._settles, []
        if batch:
            self._spawn(self.store.settle_many(batch))

    async def settled(self) -> None:
        """Send what waits for its batch now, and wait until the store has all of it."""
        for _ in range(100):
            self._flush_settles()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await asyncio.sleep(0)  # done-callbacks queue the settles of requests counted just now
            if not (self._admits or self._settles or self._tasks):
                return

    async def flush_usage(self) -> None:
        """Add this router's usage since the last flush to the store's history."""
        pending, self._usage = self._usage, {}
        records = [UsageRecord(key, model, *totals) for (key, model), totals in pending.items()]
        if not records:
            return
        try:
            await asyncio.wait_for(self.store.settle_many([Settlement([], "", 0, 0, record) for record in records]),
                                   USAGE_FLUSH_TIMEOUT_S)
        except asyncio.TimeoutError:
            # It may still land: adding it again could count it twice. History is
            # at-most-once (the Prometheus counters above have every request).
            logger.warning("Usage flush to the limits store timed out; %d request(s) may be missing from "
                           "the usage history", sum(record.requests for record in records))
        except Exception:  # noqa: BLE001 - not sent (store down): kept for the next flush
            for record in records:
                self._add_back(record)

    async def usage(self, since: float, until: float) -> list[Any]:
        await self.flush_usage()
        return await asyncio.wait_for(self.store.usage(since, until), self.settings.limits_store_timeout_s * 4)

    async def close(self) -> None:
        """Settle and flush what is pending (a router going away keeps its usage history)."""
        if self._flusher is not None:
            self._flusher.cancel()
        try:
            await self.settled()
            await self.flush_usage()
        except Exception:  # noqa: BLE001 - the store may be gone already
            logger.debug("final flush failed", exc_info=True)
        if self._store is not None:
            await self._store.close()

    # ------------------------------------------------------------------ internals

    def _refusal(self, name: str, model: str, tokens: int, decision: Decision, scopes: list[Scope]) -> RateLimitError:
        headers = rate_limit_headers(decision)
        on = f"key '{name}'" + (f" on model '{model}'" if decision.scope and "|" in decision.scope else "")
        words = _LIMIT_WORDS.get(decision.limit or "", ("its limit", "requests"))[0]
        if decision.too_large:
            limit = next((s.tokens_per_minute for s in scopes if s.name == decision.scope), decision.limit_tokens)
            return RateLimitError(
                f"Request too large for {on} on {words}: limit {limit}, requested "
                f"{tokens} (prompt estimate plus max_tokens). Lower max_tokens or shorten the prompt.",
                TOKENS, headers)
        retry = max(decision.retry_after_s, 0.001)
        headers["Retry-After"] = str(max(math.ceil(retry), 1))
        if decision.limit == CONCURRENT:
            message = f"Too many concurrent requests for {on}. Retry when one of them finishes."
        else:
            message = f"Rate limit reached for {on} on {words}. Please try again in {format_reset(retry)}."
        return RateLimitError(message, decision.limit or REQUESTS, headers)

    async def _store_call(self, call: Any) -> Any:
        """A store call within the timeout; any failure is logged (at most every 30 s) and
        raised as _StoreDown for the caller to apply limits_store_failure."""
        try:
            return await asyncio.wait_for(call, self.settings.limits_store_timeout_s)
        except Exception as error:  # noqa: BLE001 - any store failure follows the policy
            now = time.monotonic()
            if now - self._warned_at > WARN_EVERY_S:
                self._warned_at = now
                logger.warning("Limits store unreachable (%s: %s); failing %s (limits_store_failure)",
                               type(error).__name__, error, self.settings.limits_store_failure)
            raise _StoreDown from error

    def _spawn(self, call: Any) -> None:
        task = asyncio.ensure_future(self._quiet(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quiet(self, call: Any) -> None:
        try:
            await self._store_call(call)
        except _StoreDown:
            pass  # nobody waits on a settle; the reservation refills out of the bucket in time

    def _add_back(self, record: UsageRecord) -> None:
        totals = self._usage.setdefault((record.key, record.model), [0, 0, 0, 0])
        for index, value in enumerate((record.requests, record.prompt_tokens, record.completion_tokens,
                                       record.errors)):
            totals[index] += value

    async def _flush_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.flush_usage()
            except Exception:  # noqa: BLE001 - the history is best effort; metrics already counted
                logger.debug("usage flush failed", exc_info=True)
