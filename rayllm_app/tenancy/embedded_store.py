"""The embedded store: the budgets in one Ray actor, so limits work with no extra service.

Every router replica, on any node, finds the same actor by name (``rayllm-limits`` in
namespace ``rayllm``; ``get_if_exists`` makes the first caller create it and the others
attach). It is detached so it outlives the replica that happened to create it, and takes no
CPU so it never blocks a model's placement.

The actor is an async actor whose methods never await: each runs start to finish on the
actor's one event loop, so ``MemoryStore``'s state is touched by one call at a time without
locks, while ``max_concurrency`` lets many routers' calls queue without a thread each.
``max_restarts=-1``: if its node dies the actor comes back elsewhere with empty buckets
(a budget briefly forgiven beats every request failing).
"""

from __future__ import annotations

import ray

from rayllm_app.named_actor import NamedActor
from rayllm_app.tenancy.state import Decision, MemoryStore, Scope, Settlement, UsageRecord, UsageRow

ACTOR_NAME = "rayllm-limits"
ACTOR_NAMESPACE = "rayllm"


LimitsActor = ray.remote(MemoryStore)  # async methods that never await: see above


class EmbeddedStore:
    """``LimitStore`` on the shared ``LimitsActor``. The actor is looked up (or created) on
    first use, not in the constructor, so a store can be built before ``ray.init``.
    ``name``/``namespace`` exist so tests can use an actor of their own."""

    def __init__(self, name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE) -> None:
        self.name = name
        self.namespace = namespace
        # Async methods that never await, on one event loop: many routers' calls queue
        # without a thread each.
        self._actor = NamedActor(LimitsActor, name, namespace, max_concurrency=1000)

    async def _call(self, method: str, *args):
        return await self._actor.call(method, *args)

    async def admit(self, scopes: list[Scope], lease_id: str, tokens: int) -> Decision:
        return await self._call("admit", scopes, lease_id, tokens)

    async def settle(self, scopes: list[Scope], lease_id: str, reserved: int, used: int,
                     usage: UsageRecord | None) -> None:
        await self._call("settle", scopes, lease_id, reserved, used, usage)

    async def settle_many(self, items: list[Settlement]) -> None:
        """Many settles in one actor call."""
        if items:
            await self._call("settle_many", items)

    async def admit_many(self, items: list[tuple[list[Scope], str, int]]) -> list[Decision]:
        """Many admits in one actor call, decided in order."""
        return await self._call("admit_many", items) if items else []

    async def usage(self, since: float, until: float) -> list[UsageRow]:
        return await self._call("usage", since, until)

    async def ping(self) -> None:
        await self._call("ping")

    async def close(self) -> None:
        """Forget the handle only: the actor is shared with the other routers and stays."""
        self._actor.forget()
