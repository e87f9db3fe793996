"""The Redis store: the budgets of ``state.MemoryLimitState``, shared through one Redis.

Each call is one Lua script, so a check-and-consume over several scopes is atomic without
locks or round trips, and every router reads the same clock (``TIME`` on the server, not the
replicas' clocks, which may disagree). The scripts mirror ``MemoryLimitState`` step by step;
tests/tenancy runs the same cases against both.

Keys (``prefix`` defaults to ``rayllm:``): ``b:{scope}:requests`` / ``b:{scope}:tokens`` (hash
``l`` level, ``t`` time; expires once refilled, which is the same as a new bucket),
``c:{scope}`` (sorted set of lease ids by start time), ``u:{minute}`` (hash
``{key}\\n{model}\\n{field}`` -> count) and ``u:minutes`` (index of those minutes). The usage
keys are built inside the script from the server's minute, so this needs a standalone Redis
(or Sentinel), not Redis Cluster.

The client does not retry: a script retried after a timeout may already have run, and
counting a request twice is worse than letting the router's own fail-open/closed rule decide.
"""

from __future__ import annotations

from rayllm_app.tenancy.state import (
    CONCURRENT_RETRY_S,
    LEASE_S,
    USAGE_FIELDS,
    USAGE_RETENTION_S,
    ZERO_RATE_RETRY_S,
    Decision,
    Scope,
    Settlement,
    UsageRecord,
    UsageRow,
    minute_of,
    sum_usage,
)

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
local function level_of(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + cap / 60 * math.max(0, now - tonumber(v[2])))
end
local function store(key, lvl, cap)
  redis.call('HSET', key, 'l', fmt(lvl), 't', fmt(now))
  local ttl = 60
  if cap > 0 and lvl < cap then ttl = ttl + math.ceil((cap - lvl) / (cap / 60)) end
  redis.call('EXPIRE', key, ttl)
end
"""

# KEYS: per scope b:{s}:requests, b:{s}:tokens, c:{s}.
# ARGV: tokens, lease_id, LEASE_S, n, CONCURRENT_RETRY_S, ZERO_RATE_RETRY_S, then per scope
# rpm, tpm, max_concurrent ("" = no limit).
ADMIT_LUA = _COMMON + """
local tokens, lease, lease_s, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local conc_retry, zero_retry = tonumber(ARGV[5]), tonumber(ARGV[6])
local function wait(needed, lvl, cap)
  if lvl >= needed then return 0 end
  if cap > 0 then return (needed - lvl) / (cap / 60) end
  return zero_retry
end
local r_limit, r_scope, r_retry, r_large = false, false, 0, 0
local function refuse(limit, i, retry, large)
  if (not r_limit) or (large == 1 and r_large == 0) or (r_large == 0 and retry > r_retry) then
    r_limit, r_scope, r_retry, r_large = limit, i, retry, large
  end
end
local req, tok = {}, {}
for i = 1, n do
  local rpm, tpm, maxc = tonumber(ARGV[4 + 3*i]), tonumber(ARGV[5 + 3*i]), tonumber(ARGV[6 + 3*i])
  if rpm then
    req[i] = level_of(KEYS[3*i - 2], rpm)
    if req[i] < 1 then refuse('requests_per_minute', i, wait(1, req[i], rpm), 0) end
  end
  if tpm then
    tok[i] = level_of(KEYS[3*i - 1], tpm)
    if tokens > tpm then refuse('tokens_per_minute', i, 0, 1)
    elseif tok[i] < tokens then refuse('tokens_per_minute', i, wait(tokens, tok[i], tpm), 0) end
  end
  if maxc then
    redis.call('ZREMRANGEBYSCORE', KEYS[3*i], '-inf', fmt(now - lease_s))
    if not redis.call('ZSCORE', KEYS[3*i], lease) and redis.call('ZCARD', KEYS[3*i]) >= maxc then
      refuse('max_concurrent_requests', i, conc_retry, 0)
    end
  end
end
local allowed = not r_limit
local h = {false, false, false, false, false, false}
local function header(lvl, cap)
  local reset = 0
  if cap > 0 and lvl < cap then reset = (cap - lvl) / (cap / 60) end
  return math.max(0, math.floor(lvl)), fmt(reset)
end
for i = 1, n do
  local rpm, tpm, maxc = tonumber(ARGV[4 + 3*i]), tonumber(ARGV[5 + 3*i]), tonumber(ARGV[6 + 3*i])
  if allowed then
    if req[i] then req[i] = req[i] - 1; store(KEYS[3*i - 2], req[i], rpm) end
    if tok[i] then tok[i] = tok[i] - tokens; store(KEYS[3*i - 1], tok[i], tpm) end
    if maxc then
      redis.call('ZADD', KEYS[3*i], fmt(now), lease)
      redis.call('EXPIRE', KEYS[3*i], math.ceil(lease_s))
    end
  end
  if req[i] and not h[1] then h[1] = rpm; h[2], h[3] = header(req[i], rpm) end
  if tok[i] and not h[4] then h[4] = tpm; h[5], h[6] = header(tok[i], tpm) end
end
return {allowed and 1 or 0, r_limit, r_scope, fmt(r_retry), r_large, h[1], h[2], h[3], h[4], h[5], h[6]}
"""

# KEYS: per scope b:{s}:tokens, c:{s}.
# ARGV: lease_id, reserved, used, n, per scope tpm ("" = none), then prefix, retention,
# has_usage (0/1), key, model, requests, prompt_tokens, completion_tokens, errors.
SETTLE_LUA = _COMMON + """
local lease, reserved, used, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, n do
  local tpm = tonumber(ARGV[4 + i])
  if tpm then store(KEYS[2*i - 1], math.min(tpm, level_of(KEYS[2*i - 1], tpm) + reserved - used), tpm) end
  redis.call('ZREM', KEYS[2*i], lease)
end
local u = 4 + n
if ARGV[u + 3] == '1' then
  local prefix, retention = ARGV[u + 1], tonumber(ARGV[u + 2])
  local minute = math.floor(now / 60) * 60
  local hkey = prefix .. 'u:' .. string.format('%d', minute)
  local base = ARGV[u + 4] .. '\\n' .. ARGV[u + 5] .. '\\n'
  local names = {'requests', 'prompt_tokens', 'completion_tokens', 'errors'}
  for j = 1, 4 do redis.call('HINCRBY', hkey, base .. names[j], ARGV[u + 5 + j]) end
  redis.call('EXPIRE', hkey, math.ceil(retention) + 60)
  local index = prefix .. 'u:minutes'
  redis.call('ZADD', index, minute, string.format('%d', minute))
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. fmt(now - retention))
  redis.call('EXPIRE', index, math.ceil(retention) + 60)
end
return 1
"""


def _opt(value: int | None) -> str:
    return "" if value is None else str(int(value))


class RedisStore:
    """``LimitStore`` on Redis (``redis://``, ``rediss://`` or ``unix://`` URL)."""

    def __init__(self, url: str, prefix: str = "rayllm:", *, connect_timeout_s: float = 0.5,
                 timeout_s: float = 2.0) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.prefix = prefix
        self._client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=connect_timeout_s,
                                      socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self._admit = self._client.register_script(ADMIT_LUA)
        self._settle = self._client.register_script(SETTLE_LUA)

    def _bucket(self, scope: str, dim: str) -> str:
        return f"{self.prefix}b:{scope}:{dim}"

    def _leases(self, scope: str) -> str:
        return f"{self.prefix}c:{scope}"

    async def admit(self, scopes: list[Scope], lease_id: str, tokens: int) -> Decision:
        keys, args = self._admit_call(scopes, lease_id, tokens)
        return _decision(scopes, await self._admit(keys=keys, args=args))

    async def admit_many(self, items: list[tuple[list[Scope], str, int]]) -> list[Decision]:
        """Many admits in one round trip (a pipeline of the admit script), decided in order."""
        if not items:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for scopes, lease_id, tokens in items:
                keys, args = self._admit_call(scopes, lease_id, tokens)
                await self._admit(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return [_decision(item[0], result) for item, result in zip(items, results)]

    def _admit_call(self, scopes: list[Scope], lease_id: str, tokens: int) -> tuple[list[str], list]:
        keys: list[str] = []
        args: list[str | int | float] = [int(tokens), lease_id, LEASE_S, len(scopes),
                                         CONCURRENT_RETRY_S, ZERO_RATE_RETRY_S]
        for scope in scopes:
            keys += [self._bucket(scope.name, "requests"), self._bucket(scope.name, "tokens"),
                     self._leases(scope.name)]
            args += [_opt(scope.requests_per_minute), _opt(scope.tokens_per_minute),
                     _opt(scope.max_concurrent_requests)]
        return keys, args

    async def settle(self, scopes: list[Scope], lease_id: str, reserved: int, used: int,
                     usage: UsageRecord | None) -> None:
        await self._settle(*self._settle_call(scopes, lease_id, reserved, used, usage))

    async def settle_many(self, items: list[Settlement]) -> None:
        """Many settles in one round trip (a pipeline of the settle script)."""
        if not items:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for item in items:
                await self._settle(*self._settle_call(item.scopes, item.lease_id, item.reserved, item.used,
                                                      item.usage), client=pipe)
            await pipe.execute()

    def _settle_call(self, scopes: list[Scope], lease_id: str, reserved: int, used: int,
                     usage: UsageRecord | None) -> tuple[list[str], list[str | int | float]]:
        keys: list[str] = []
        args: list[str | int | float] = [lease_id, int(reserved), int(used), len(scopes)]
        for scope in scopes:
            keys += [self._bucket(scope.name, "tokens"), self._leases(scope.name)]
            args.append(_opt(scope.tokens_per_minute))
        args += [self.prefix, USAGE_RETENTION_S, 0 if usage is None else 1]
        if usage is not None:
            args += [usage.key, usage.model, *(int(getattr(usage, name)) for name in USAGE_FIELDS)]
        return keys, args

    async def usage(self, since: float, until: float) -> list[UsageRow]:
        minutes = await self._client.zrangebyscore(f"{self.prefix}u:minutes", minute_of(since), until)
        if not minutes:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for minute in minutes:
                pipe.hgetall(f"{self.prefix}u:{minute}")
            hashes = await pipe.execute()
        pairs = []
        for fields in hashes:
            for name, value in fields.items():
                key, model, field = name.rsplit("\n", 2)
                values = [0, 0, 0, 0]
                values[USAGE_FIELDS.index(field)] = int(value)
                pairs.append(((key, model), values))
        return sum_usage(pairs)

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


def _decision(scopes: list[Scope], result: list) -> Decision:
    """The admit script's answer as a Decision."""
    (allowed, limit, index, retry, large, limit_req, rem_req, reset_req, limit_tok, rem_tok, reset_tok) = result
    return Decision(
        allowed=bool(allowed), limit=limit or None,
        scope=scopes[int(index) - 1].name if index else None,
        retry_after_s=float(retry), too_large=bool(large),
        limit_requests=limit_req, remaining_requests=rem_req,
        reset_requests_s=None if reset_req is None else float(reset_req),
        limit_tokens=limit_tok, remaining_tokens=rem_tok,
        reset_tokens_s=None if reset_tok is None else float(reset_tok))
