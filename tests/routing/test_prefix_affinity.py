"""Prefix-cache and session affinity: the router's keys for a request (rayllm_app.router.affinity)
and the replica ranking they drive (rayllm_app.routing.prefix_affinity)."""

from __future__ import annotations

from rayllm_app.config.routing_config import RoutingConfig
from rayllm_app.router.affinity import affinity_keys, chain_root, new_response_id, prefix_keys, prompt_text
from rayllm_app.routing.prefix_affinity import PrefixIndex, rank_by_affinity
from tests.routing.test_adapter_affinity import ids, replicas

PREFIX = RoutingConfig(policy="prefix_aware", block_chars=64)
SESSION = RoutingConfig(policy="session")
SYSTEM = "You are a careful assistant who answers in full sentences. " * 4  # 4 whole blocks and more


def chat(*contents: str, **extra) -> dict:
    roles = ["system", "user", "assistant"]
    return {"model": "m", "messages": [{"role": roles[min(i, 1) if i < 2 else 1 + i % 2], "content": c}
                                       for i, c in enumerate(contents)], **extra}


def test_prefix_keys_are_shared_exactly_as_far_as_the_prompts_match():
    one = affinity_keys(PREFIX, "/v1/chat/completions", chat(SYSTEM, "What is the capital of France?"), {})
    two = affinity_keys(PREFIX, "/v1/chat/completions", chat(SYSTEM, "Name three rivers in Germany, please."), {})
    same_prefix = len(prompt_text("/v1/chat/completions", chat(SYSTEM))) // 64
    assert one[:same_prefix] == two[:same_prefix] and one[same_prefix:] != two[same_prefix:]
    assert one == affinity_keys(PREFIX, "/v1/chat/completions", chat(SYSTEM, "What is the capital of France?"), {})
    # A conversation's next turn extends its keys: the earlier turn's are its prefix.
    longer = affinity_keys(PREFIX, "/v1/chat/completions",
                           chat(SYSTEM, "What is the capital of France?", "Paris is the capital of France.",
                                "And which city is the capital of Spain, and since when?"), {})
    whole = len(prompt_text("/v1/chat/completions", chat(SYSTEM, "What is the capital of France?"))) // 64
    assert longer[:whole] == one[:whole] and len(longer) > len(one)


def test_only_whole_blocks_count_and_long_prompts_are_bounded():
    assert prefix_keys(b"x" * 63, 64, 10) == ()
    assert len(prefix_keys(b"x" * 64, 64, 10)) == 1
    assert len(prefix_keys(b"x" * 6400, 64, 10)) == 10
    short = affinity_keys(PREFIX, "/v1/completions", {"model": "m", "prompt": "hi"}, {})
    assert short == ()  # nothing cached to aim at: routed by load
    assert affinity_keys(PREFIX, "/v1/completions", {"model": "m", "prompt": "hi", "user": "u1"}, {}) \
        == affinity_keys(SESSION, "/v1/chat/completions", chat("other"), {"x-session-id": "u1"})


def test_sessions_by_header_then_user_and_none_without_either():
    assert affinity_keys(SESSION, "/v1/chat/completions", chat("a"), {"x-session-id": "s1"}) == \
        affinity_keys(SESSION, "/v1/chat/completions", chat("b", user="someone"), {"x-session-id": "s1"})
    assert affinity_keys(SESSION, "/v1/chat/completions", chat("a", user="u1"), {}) != \
        affinity_keys(SESSION, "/v1/chat/completions", chat("a", user="u2"), {})
    assert affinity_keys(SESSION, "/v1/chat/completions", chat("a"), {}) == ()
    assert affinity_keys(RoutingConfig(), "/v1/chat/completions", chat("a"), {"x-session-id": "s1"}) == ()


def test_every_turn_of_a_responses_chain_has_the_first_turns_key():
    first = new_response_id(None)
    second = new_response_id(first)
    third = new_response_id(second)
    assert len({first, second, third}) == 3 and all(len(i) == 37 for i in (first, second, third))
    keys = {affinity_keys(SESSION, "/v1/responses", {"model": "m"}, {}, i) for i in (first, second, third)}
    assert len(keys) == 1
    assert chain_root(first) != chain_root(None)  # a first turn starts a chain of its own
    assert chain_root("my-own-id") == chain_root("my-own-id")  # a client's own ids: stable too
    prefix_policy = affinity_keys(PREFIX, "/v1/responses", {"model": "m"}, {}, third)
    assert prefix_policy == keys.pop()  # Responses keep their chain under prefix_aware too


def test_the_deepest_known_prefix_wins():
    pool = replicas("r1", "r2", "r3")
    index = PrefixIndex(100)
    index.record((1, 2, 3, 4), "r3")
    index.record((1, 2), "r2")  # a later request that shared only two blocks went elsewhere
    assert ids(rank_by_affinity((1, 2, 9), pool, index, {}, 8))[0] == ["r2"]
    assert ids(rank_by_affinity((1, 2, 3, 4, 5), pool, index, {}, 8))[0] == ["r3"]
    # The choice is remembered for all the request's keys.
    assert ids(rank_by_affinity((1, 2, 9, 10), pool, index, {}, 8))[0] == ["r2"]


def test_a_new_prefix_goes_where_every_router_would_send_it():
    pool = replicas("r1", "r2", "r3")
    one, two = PrefixIndex(100), PrefixIndex(100)
    for first in range(40):
        a = ids(rank_by_affinity((first, 7), pool, one, {}, 8))[0]
        b = ids(rank_by_affinity((first, 8), list(reversed(pool)), two, {}, 8))[0]
        assert a == b  # two routers, no shared state, same first block: same replica
    assert {ids(rank_by_affinity((n,), pool, PrefixIndex(10), {}, 8))[0][0] for n in range(60)} == {"r1", "r2", "r3"}


def test_the_load_guard_spreads_a_hot_prefix_and_then_remembers_where():
    pool = replicas("r1", "r2", "r3")
    index = PrefixIndex(100)
    hot = ids(rank_by_affinity((5, 6), pool, index, {}, 2))[0][0]
    queue = {name: 0 for name in ("r1", "r2", "r3")}
    queue[hot] = 2
    assert ids(rank_by_affinity((5, 6), pool, index, queue, 2))[0] == [hot]  # at the guard: stays
    queue[hot] = 3
    spread = ids(rank_by_affinity((5, 6, 7), pool, index, queue, 2))
    assert spread[0] != [hot] and spread[1][-1] == hot  # past it: the least loaded, the hot one last
    assert ids(rank_by_affinity((5, 6, 7), pool, index, {}, 2))[0] == spread[0]  # its keys moved with it


def test_a_gone_replica_is_never_chosen_from_the_index():
    index = PrefixIndex(100)
    index.record((1,), "gone")
    assert ids(rank_by_affinity((1,), replicas("r1", "r2"), index, {}, 8))[0][0] in {"r1", "r2"}


def test_the_index_forgets_the_least_recently_used():
    index = PrefixIndex(3)
    index.record((1, 2, 3), "r1")
    index.record((4,), "r2")
    assert len(index) == 3
    assert index.depths((1,), {"r1"}) == {} and index.depths((3,), {"r1"}) == {"r1": (1, 0)}


def test_every_replica_a_prefix_went_to_is_remembered_the_latest_first():
    index = PrefixIndex(100, holders=2)
    index.record((1, 2), "r1")
    index.record((1, 3), "r2")
    assert index.depths((1, 2), {"r1", "r2"}) == {"r1": (2, 0), "r2": (1, 0)}
    index.record((1,), "r3")
    assert index.depths((1,), {"r1", "r2", "r3"}) == {"r3": (1, 0), "r2": (1, 1)}  # r1: beyond 2 holders
    assert index.depths((1, 2), {"r2"}) == {"r2": (1, 1)}  # only live replicas count


def test_a_prefix_every_replica_holds_is_placed_by_load():
    """A conversation's first turn shares only the system prompt (keys 1, 2), which both
    replicas have seen: it goes to the less loaded one. Its next turn follows its own history
    there, with a guard for what that replica holds beyond the other (1 key of 4: 4 * 1 // 4)."""
    pool = replicas("r1", "r2")

    def seen_system_prompt() -> PrefixIndex:
        index = PrefixIndex(100)
        index.record((1, 2, 3), "r1")
        index.record((1, 2, 4), "r2")
        return index

    assert ids(rank_by_affinity((1, 2, 5), pool, seen_system_prompt(), {"r1": 1, "r2": 0}, 4))[0] == ["r2"]
    index = seen_system_prompt()
    assert ids(rank_by_affinity((1, 2, 5), pool, index, {"r1": 0, "r2": 1}, 4))[0] == ["r1"]
    assert ids(rank_by_affinity((1, 2, 5, 6), pool, index, {"r1": 1, "r2": 0}, 4))[0] == ["r1"]
    assert ids(rank_by_affinity((1, 2, 5, 7), pool, index, {"r1": 2, "r2": 0}, 4))[0] == ["r2"]


def test_round_robin_and_power_of_two_send_no_keys():
    for policy in ("round_robin", "power_of_two"):
        assert affinity_keys(RoutingConfig(policy=policy), "/v1/chat/completions", chat(SYSTEM, "q"),
                             {"x-session-id": "s"}) == ()


def test_the_guard_shrinks_with_the_share_of_the_prompt_a_replica_holds():
    """A short hot prefix before a long unique suffix saves little: the request waits behind
    fewer requests for it than a prompt that is cached whole."""
    pool = replicas("r1", "r2")
    index = PrefixIndex(100)
    hot = ids(rank_by_affinity((1, 2), pool, index, {}, 4))[0][0]
    cold = "r2" if hot == "r1" else "r1"
    queue = {hot: 3, cold: 0}
    # The whole prompt known there (2 of 2 keys): the full guard of 4, it stays.
    assert ids(rank_by_affinity((1, 2), pool, index, queue, 4))[0] == [hot]
    # 2 of 8 keys known there: a guard of 1, so 3 requests more is too many.
    assert ids(rank_by_affinity((1, 2, 30, 31, 32, 33, 34, 35), pool, index, queue, 4))[0] == [cold]
