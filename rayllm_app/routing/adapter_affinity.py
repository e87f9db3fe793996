"""Replica choice for models with LoRA adapters: send an adapter's requests to a replica that
holds it, with a load guard.

Ray Serve runs our request router (rayllm_app.routing.replica_router) in the caller's process
(our router's replicas) for every handle call to a model deployment with ``lora_config``; the
call's ``multiplexed_model_id`` names the adapter. Replicas report the adapters they hold in their routing stats (every
``STATS_PERIOD_S``). For an adapter request:

1. replicas that report holding the adapter come first;
2. if none does, the one replica that rendezvous hashing picks for it comes first: every
   router, and concurrent first requests, agree on it without talking, so one replica loads
   the adapter, not each that a first request happened to reach;
3. the load guard: when that preferred replica has more than ``load_guard`` requests above
   the least loaded replica, the least loaded ones come first instead; they load the adapter
   too, and a hot adapter spreads.

Ray then takes, within the first rank, the replica with the shortest queue that accepts the
request, and falls back to the next rank when all of them are full. Requests without an
adapter (the base model) are routed by power of two choices, as Serve's default router does.
"""

from __future__ import annotations

import hashlib
from typing import Any

DEFAULT_LOAD_GUARD = 8


def rendezvous_score(adapter: str, replica_id: str) -> int:
    """Highest random weight: stable across processes (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{adapter}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_for_adapter(adapter: str, replicas: list[Any], holders: set[str], queue_len: dict[str, int],
                     load_guard: int) -> list[list[Any]]:
    """The ranked replica groups for one adapter request (pure: unit-tested without Ray).

    ``replicas`` have ``replica_id.unique_id``; ``holders`` are the ids that hold the adapter;
    ``queue_len`` is what this router last knew of each replica's requests (0 when unknown).
    """
    if not replicas:
        return []

    def rid(replica: Any) -> str:
        return replica.replica_id.unique_id

    preferred = [r for r in replicas if rid(r) in holders]
    if not preferred:
        preferred = [max(replicas, key=lambda r: rendezvous_score(adapter, rid(r)))]
    others = [r for r in replicas if r not in preferred]
    least = min(queue_len.get(rid(r), 0) for r in replicas)
    if others and min(queue_len.get(rid(r), 0) for r in preferred) - least > load_guard:
        others.sort(key=lambda r: queue_len.get(rid(r), 0))
        return [others, preferred]
    return [preferred, others] if others else [preferred]
