"""Replica choice by prefix-cache and session affinity (``routing.policy``: ``prefix_aware``
or ``session``), with a load guard. Pure functions and one index: unit-tested without Ray.

The router computes a request's affinity keys (rayllm_app.router.affinity): chained hashes of
its prompt's blocks for ``prefix_aware`` (key i stands for the whole prefix up to block i), or
one key for its session. Here, per request:

1. **the deepest match wins**: the index remembers, for every key a request had, the replicas
   it went to (the latest first); the replica that holds the longest prefix of this request
   holds the most of its KV cache. Between replicas that hold as much, the less loaded wins,
   then the one that got the prefix last;
2. **an unknown prefix goes where rendezvous hashing puts its first key**: every router, and a
   router after a restart, agrees on it without talking, so a prefix group starts on one
   replica whoever routes it;
3. **the load guard**: the least loaded replica takes the request instead when the chosen one
   has more requests than it by more than ``load_guard`` scaled by the share of the prompt the
   chosen one holds *beyond* the least loaded one (all of a repeated prompt that only it
   holds: the whole guard; a short hot prefix before a long unique suffix: a small part of it;
   a prefix both hold, such as a system prompt every replica has seen: nothing, so the load
   decides). A new prefix (no replica holds any of it) gets the whole guard, so that its group
   starts on one replica. The request's keys then name the replica it went to as well, so a
   hot prefix spreads to a second replica instead of piling onto one, and a conversation
   whose shared system prompt every replica holds is placed by load on its first turn and
   follows its own history after that.

The index is approximate: it knows where requests were sent, not what each engine still
caches (an engine may have evicted a block). Each router keeps its own, and adds what every
replica reports it served (rayllm_app.routing.served_keys, polled every few seconds), so
routers agree within a poll period, and a restarted router within one period too. Routers
that disagree meanwhile (a turn routed by one router reaches another before the next poll)
cost a prefill, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from rayllm_app.routing.adapter_affinity import rendezvous_score
from rayllm_app.routing.served_keys import served_depth


class PrefixIndex:
    """Affinity key -> the replica ids its requests went to, the latest first (at most
    ``holders``); keys least recently used are forgotten first, past ``size`` keys."""

    def __init__(self, size: int, holders: int = 8) -> None:
        self.size = size
        self.holders = holders
        self._owners: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def depths(self, keys: Sequence[int], live: Collection[str]) -> dict[str, tuple[int, int]]:
        """For each live replica holding a prefix of ``keys``: (how many keys deep its longest
        one is, its place among that key's holders, 0 = the latest)."""
        owners, found = self._owners, {}
        for depth in range(len(keys), 0, -1):
            for place, owner in enumerate(owners.get(keys[depth - 1], ())):
                if owner in live and owner not in found:
                    found[owner] = (depth, place)
            if len(found) == len(live):
                break
        return found

    def record(self, keys: Sequence[int], replica_id: str) -> None:
        owners = self._owners
        for key in keys:
            held = owners.get(key, ())
            owners[key] = (replica_id, *(r for r in held if r != replica_id))[:self.holders]
            owners.move_to_end(key)
        while len(owners) > self.size:
            owners.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


def rank_by_affinity(keys: Sequence[int], replicas: list[Any], index: PrefixIndex, queue_len: dict[str, int],
                     load_guard: int, served: Mapping[str, bytes | None] | None = None) -> list[list[Any]]:
    """Ranked replica groups for a request with affinity ``keys``; the first group is the one
    replica chosen (Ray falls back to the next group only if it is full), and the index
    remembers it for the request's keys. ``served``: each replica's filter of the keys it
    served (rayllm_app.routing.served_keys), which covers what other routers sent there."""
    if not replicas:
        return []

    def rid(replica: Any) -> str:
        return replica.replica_id.unique_id

    def load(replica: Any) -> int:
        return queue_len.get(rid(replica), 0)

    held = index.depths(keys, {rid(r) for r in replicas})
    for replica_id, bits in (served or {}).items():
        depth = served_depth(bits, keys)
        if depth > held.get(replica_id, (0, 0))[0]:
            held[replica_id] = (depth, index.holders)  # known from the replica: after the router's own
    if held:
        def standing(replica: Any) -> tuple[int, int, int]:
            depth, place = held.get(rid(replica), (0, index.holders))
            return depth, -load(replica), -place
        preferred = max(replicas, key=standing)
    else:
        first = str(keys[0])
        preferred = max(replicas, key=lambda r: rendezvous_score(first, rid(r)))
    others = sorted((r for r in replicas if r is not preferred), key=load)
    chosen = preferred
    if others:
        least = others[0]
        # Worth waiting for in proportion to what it saves over the least loaded replica.
        extra = held.get(rid(preferred), (0, 0))[0] - held.get(rid(least), (0, 0))[0]
        guard = load_guard * extra // len(keys) if held else load_guard
        if load(preferred) - load(least) > guard:
            chosen = others.pop(0)
            others.append(preferred)
    index.record(keys, rid(chosen))
    return [[chosen], others] if others else [[chosen]]
