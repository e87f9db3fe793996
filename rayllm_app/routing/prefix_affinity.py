"""Replica choice by prefix-cache and session affinity (``routing.policy``: ``prefix_aware``
or ``session``), with a load guard. Pure functions and one index: unit-tested without Ray.

The router computes a request's affinity keys (rayllm_app.router.affinity): chained hashes of
its prompt's blocks for ``prefix_aware`` (key i stands for the whole prefix up to block i), or
one key for its session. Here, per request:

1. **the deepest known key wins**: the index remembers, for every key a request had, the replica
   it went to; the replica of the longest prefix this request shares with an earlier one holds
   the most of its KV cache;
2. **an unknown prefix goes where rendezvous hashing puts its first key**: every router, and a
   router after a restart, agrees on it without talking, so a prefix group starts on one
   replica whoever routes it;
3. **the load guard**: when that replica has more requests than the least loaded one, by more
   than ``load_guard`` scaled by the share of the prompt it holds (all of a repeated prompt:
   the whole guard; a short hot prefix before a long unique suffix: a small part of it, as the
   cache saves little there), the least loaded takes the request instead (the index then points
   the request's keys there, so a hot prefix spreads to a second replica instead of piling
   onto one). A new prefix (no replica holds any of it) gets the whole guard, so that its
   group starts on one replica.

The index is approximate: it knows where requests were sent, not what each engine still
caches (an engine may have evicted a block), and each router keeps its own. Routers that
disagree (one saw a guard trip the other did not) cost a prefill, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from rayllm_app.routing.adapter_affinity import rendezvous_score


class PrefixIndex:
    """Affinity key -> the replica id its last request went to; least recently used out first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._owners: OrderedDict[int, str] = OrderedDict()

    def deepest(self, keys: Sequence[int], live: dict[str, Any]) -> tuple[Any | None, int]:
        """The live replica of the deepest key known and how many keys deep it is, or (None, 0)."""
        owners = self._owners
        for depth in range(len(keys), 0, -1):
            owner = owners.get(keys[depth - 1])
            if owner is not None and owner in live:
                return live[owner], depth
        return None, 0

    def record(self, keys: Sequence[int], replica_id: str) -> None:
        owners = self._owners
        for key in keys:
            owners[key] = replica_id
            owners.move_to_end(key)
        while len(owners) > self.size:
            owners.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


def rank_by_affinity(keys: Sequence[int], replicas: list[Any], index: PrefixIndex, queue_len: dict[str, int],
                     load_guard: int) -> list[list[Any]]:
    """Ranked replica groups for a request with affinity ``keys``; the first group is the one
    replica chosen (Ray falls back to the next group only if it is full), and the index
    remembers it for the request's keys."""
    if not replicas:
        return []

    def rid(replica: Any) -> str:
        return replica.replica_id.unique_id

    live = {rid(r): r for r in replicas}
    preferred, depth = index.deepest(keys, live)
    guard = load_guard
    if preferred is None:
        first = str(keys[0])
        preferred = max(replicas, key=lambda r: rendezvous_score(first, rid(r)))
    else:
        # Worth waiting for in proportion to what it saves: the share of the prompt cached there.
        guard = load_guard * depth // len(keys)
    others = sorted((r for r in replicas if r is not preferred), key=lambda r: queue_len.get(rid(r), 0))
    chosen = preferred
    if others and queue_len.get(rid(preferred), 0) - queue_len.get(rid(others[0]), 0) > guard:
        chosen = others.pop(0)
        others.append(preferred)
    index.record(keys, rid(chosen))
    return [[chosen], others] if others else [[chosen]]
