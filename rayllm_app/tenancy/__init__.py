"""Shared state for per-API-key rate limits and usage accounting.

Router replicas (several, maybe on several nodes) must share each key's budgets, so the
state lives outside them, in one of two interchangeable stores with identical semantics:

* :mod:`~rayllm_app.tenancy.state` - the values exchanged (``Scope``, ``Decision``, usage
  records) and the algorithm itself in plain Python (``MemoryLimitState``)
* :mod:`~rayllm_app.tenancy.embedded_store` - ``EmbeddedStore``: a detached Ray actor, no extra service
* :mod:`~rayllm_app.tenancy.redis_store` - ``RedisStore``: atomic Lua scripts on a Redis server
* :mod:`~rayllm_app.tenancy.stores` - the ``LimitStore`` protocol and ``open_store(url)``

``EmbeddedStore`` and ``RedisStore`` are re-exported lazily: importing this package (say, to
validate a config) loads neither Ray nor redis.
"""

from rayllm_app.tenancy.state import (
    CONCURRENT,
    LEASE_S,
    REQUESTS,
    TOKENS,
    Decision,
    MemoryLimitState,
    MemoryStore,
    Scope,
    Settlement,
    UsageRecord,
    UsageRow,
)
from rayllm_app.tenancy.stores import LimitStore, open_store

__all__ = [
    "Settlement",
    "CONCURRENT", "LEASE_S", "REQUESTS", "TOKENS", "Decision", "EmbeddedStore", "LimitStore",
    "MemoryLimitState", "MemoryStore", "RedisStore", "Scope", "UsageRecord", "UsageRow", "open_store",
]


def __getattr__(name: str):
    if name == "EmbeddedStore":
        from rayllm_app.tenancy.embedded_store import EmbeddedStore

        return EmbeddedStore
    if name == "RedisStore":
        from rayllm_app.tenancy.redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
