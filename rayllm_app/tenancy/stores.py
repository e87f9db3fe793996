"""The store interface the router codes against, and the choice of store from one setting.

``None``/``"embedded"`` keeps budgets in a Ray actor (nothing to run besides Ray); a Redis
URL shares them through Redis (survives a Ray cluster restart, and other services can read
the usage). Both stores have the same semantics (tests/tenancy runs one suite on both).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rayllm_app.tenancy.state import Decision, Scope, Settlement, UsageRecord, UsageRow

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@runtime_checkable
class LimitStore(Protocol):
    async def admit(self, scopes: list[Scope], lease_id: str, tokens: int) -> Decision:
        """Check every scope and, only if all pass, count the request in all of them."""

    async def settle(self, scopes: list[Scope], lease_id: str, reserved: int, used: int,
                     usage: UsageRecord | None) -> None:
        """Return ``reserved - used`` tokens (negative: debt), free the lease, record usage."""

    async def settle_many(self, items: list[Settlement]) -> None:
        """Several settles in one call (one round trip)."""

    async def admit_many(self, items: list[tuple[list[Scope], str, int]]) -> list[Decision]:
        """Several admits in one call, decided in order (``admit``'s answer for each)."""

    async def usage(self, since: float, until: float) -> list[UsageRow]:
        """Usage summed over [since, until] (unix seconds, minute granularity), sorted by (key, model)."""

    async def ping(self) -> None:
        """Raise if the store is unreachable."""

    async def close(self) -> None:
        """Release connections; the shared state stays."""


def open_store(url: str | None, prefix: str = "rayllm:") -> LimitStore:
    """The store a ``limits_store`` setting names: None or "embedded", or a Redis URL."""
    if url is None or url.strip() == "embedded":
        from rayllm_app.tenancy.embedded_store import EmbeddedStore

        return EmbeddedStore()
    if url.startswith(REDIS_SCHEMES):
        from rayllm_app.tenancy.redis_store import RedisStore

        return RedisStore(url, prefix=prefix)
    raise ValueError(
        f"unknown limits store {url!r}: use 'embedded' (or leave it unset) for the built-in Ray "
        "actor, or a Redis URL: redis://host:port/db, rediss://host:port/db (TLS) or "
        "unix:///path/to/redis.sock")
