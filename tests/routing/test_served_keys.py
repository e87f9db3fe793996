"""A replica's served affinity keys as a Bloom filter (rayllm_app.routing.served_keys), and a
router ranking by them what it never routed itself (rayllm_app.routing.prefix_affinity)."""

from __future__ import annotations

import random

from rayllm_app.routing.prefix_affinity import PrefixIndex, rank_by_affinity
from rayllm_app.routing.served_keys import BITS, ServedKeys, contains, served_depth
from tests.routing.test_adapter_affinity import ids, replicas


def random_keys(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(n)]


def test_the_filter_holds_every_served_key_and_few_others():
    rng = random.Random(7)
    served = ServedKeys()
    keys = random_keys(rng, 30_000)
    served.add(keys)
    bits = served.filter()
    assert len(bits) == BITS // 8
    assert all(contains(bits, k) for k in keys)
    false = sum(contains(bits, k) for k in random_keys(rng, 20_000))
    assert false <= 20, f"{false} false positives in 20,000 (expected about 4)"


def test_depth_is_how_far_a_requests_prefix_was_served():
    rng = random.Random(1)
    conversation = random_keys(rng, 40)
    served = ServedKeys()
    served.add(conversation[:25])
    assert served_depth(served.filter(), conversation) == 25
    assert served_depth(served.filter(), conversation[:10]) == 10
    assert served_depth(served.filter(), random_keys(rng, 5)) == 0
    assert served_depth(None, conversation) == 0 and served_depth(b"short", conversation) == 0


def test_the_least_recently_served_go_first_and_shared_prefixes_stay():
    rng = random.Random(2)
    system = random_keys(rng, 4)
    served = ServedKeys(capacity=12)
    old = system + random_keys(rng, 6)
    served.add(old)
    newer = system + random_keys(rng, 6)
    served.add(newer)  # 16 keys seen, 12 kept: the old request's oldest own keys went, not the system's
    assert len(served) == 12
    assert served_depth(served.filter(), newer) == 10
    assert served_depth(served.filter(), system + [old[4]]) == 4


def test_the_filter_is_rebuilt_only_after_new_keys():
    served = ServedKeys()
    served.add([1, 2, 3])
    first = served.filter()
    assert served.filter() is first
    served.add([4])
    assert served.filter() is not first and contains(served.filter(), 4)


def test_a_router_follows_what_another_router_sent_to_a_replica():
    """A conversation's earlier turns went to r2 through another router: this router's index
    is empty (or it just restarted), but r2's filter holds the conversation's keys."""
    rng = random.Random(3)
    pool = replicas("r1", "r2")
    turn = random_keys(rng, 12)
    on_r2 = ServedKeys()
    on_r2.add(turn[:9])
    served = {"r1": ServedKeys().filter(), "r2": on_r2.filter()}
    index = PrefixIndex(100)
    assert ids(rank_by_affinity(turn, pool, index, {}, 4, served))[0] == ["r2"]
    # Without the filters, the same router would have gone by rendezvous hashing; try keys
    # whose rendezvous pick is r1, to show the filter is what decided.
    for _ in range(50):
        turn = random_keys(rng, 12)
        if ids(rank_by_affinity(turn, pool, PrefixIndex(100), {}, 4))[0] == ["r1"]:
            break
    on_r2.add(turn[:9])
    served["r2"] = on_r2.filter()
    assert ids(rank_by_affinity(turn, pool, PrefixIndex(100), {}, 4, served))[0] == ["r2"]
    # The load guard still applies: r2 holds 9 of 12 keys beyond r1, a guard of 4 * 9 // 12 = 3.
    assert ids(rank_by_affinity(turn, pool, PrefixIndex(100), {"r2": 3}, 4, served))[0] == ["r2"]
    assert ids(rank_by_affinity(turn, pool, PrefixIndex(100), {"r2": 4}, 4, served))[0] == ["r1"]
