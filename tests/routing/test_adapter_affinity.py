"""Adapter-aware replica choice: holders first, one agreed replica for a new adapter, and a
load guard that spreads a hot adapter."""

from __future__ import annotations

from dataclasses import dataclass

from rayllm_app.routing.adapter_affinity import rank_for_adapter, rendezvous_score


@dataclass(frozen=True)
class _Id:
    unique_id: str


@dataclass(frozen=True)
class Replica:
    replica_id: _Id


def replicas(*names: str) -> list[Replica]:
    return [Replica(_Id(name)) for name in names]


def ids(ranks: list[list[Replica]]) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_replicas_holding_the_adapter_come_first():
    pool = replicas("r1", "r2", "r3")
    assert ids(rank_for_adapter("m:a", pool, {"r2"}, {}, 8)) == [["r2"], ["r1", "r3"]]
    assert ids(rank_for_adapter("m:a", pool, {"r1", "r3"}, {}, 8)) == [["r1", "r3"], ["r2"]]


def test_a_new_adapter_goes_to_one_replica_that_every_router_agrees_on():
    pool = replicas("r1", "r2", "r3")
    choices = {ids(rank_for_adapter(f"m:{n}", pool, set(), {}, 8))[0][0] for n in range(60)}
    assert choices == {"r1", "r2", "r3"}  # adapters spread over the replicas
    first = ids(rank_for_adapter("m:x", pool, set(), {}, 8))
    assert ids(rank_for_adapter("m:x", list(reversed(pool)), set(), {}, 8))[0] == first[0]  # order-free
    assert first[0] == [max(["r1", "r2", "r3"], key=lambda r: rendezvous_score("m:x", r))]


def test_the_load_guard_sends_a_hot_adapter_to_the_least_loaded_replicas():
    pool = replicas("r1", "r2", "r3")
    busy = {"r1": 20, "r2": 3, "r3": 11}
    assert ids(rank_for_adapter("m:a", pool, {"r1"}, busy, 8)) == [["r2", "r3"], ["r1"]]
    assert ids(rank_for_adapter("m:a", pool, {"r1"}, {"r1": 11, "r2": 3, "r3": 5}, 8)) == [["r1"], ["r2", "r3"]]  # 8 above: kept


def test_a_single_replica_is_always_chosen():
    pool = replicas("r1")
    assert ids(rank_for_adapter("m:a", pool, set(), {"r1": 100}, 0)) == [["r1"]]
    assert rank_for_adapter("m:a", [], set(), {}, 8) == []
