"""The Ray Serve request router of models with LoRA adapters or an affinity routing policy.

Serve runs it in the caller's process (our router's replicas) for every handle call to such a
model's deployment, and asks it to rank the model's replicas for one request:

- an adapter request (the call's ``multiplexed_model_id``): where the adapter is loaded
  (rayllm_app.routing.adapter_affinity);
- a request with affinity keys (``ForwardedRequest.affinity``: its session, or its prompt's
  prefix blocks): by prefix-cache and session affinity (rayllm_app.routing.prefix_affinity);
- under ``round_robin``: each replica in turn;
- anything else: Serve's power of two choices.
"""

from __future__ import annotations

from typing import Any

from ray.serve._private.request_router.pow_2_router import (
    PowerOfTwoChoicesRequestRouter,
)
from ray.serve.request_router import PendingRequest, RunningReplica

from rayllm_app.routing.adapter_affinity import DEFAULT_LOAD_GUARD, rank_for_adapter
from rayllm_app.routing.prefix_affinity import PrefixIndex, rank_by_affinity

STATS_PERIOD_S = 2.0
STATS_TIMEOUT_S = 2.0


class ReplicaRouter(PowerOfTwoChoicesRequestRouter):
    def initialize_state(self, adapter_load_guard: int = DEFAULT_LOAD_GUARD, load_guard: int = DEFAULT_LOAD_GUARD,
                         index_size: int = 200_000, policy: str = "power_of_two", **kwargs: Any) -> None:
        self.policy = policy
        self.turn = 0
        self.adapter_load_guard = adapter_load_guard
        self.load_guard = load_guard
        self.index = PrefixIndex(index_size)

    def _queue_lengths(self, replicas: list[RunningReplica]) -> dict[str, int]:
        cache = self.replica_queue_len_cache
        return {r.replica_id.unique_id: cache.get(r.replica_id) or 0 for r in replicas}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            holders = {r.replica_id.unique_id for r in candidate_replicas
                       if adapter in ((r.routing_stats or {}).get("adapters") or ())}
            return rank_for_adapter(adapter, candidate_replicas, holders, self._queue_lengths(candidate_replicas),
                                    self.adapter_load_guard)
        if self.policy == "round_robin" and candidate_replicas:
            ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            self.turn += 1
            first = ordered[self.turn % len(ordered)]
            return [[first], [r for r in ordered if r is not first]]
        forwarded = pending_request.args[0] if pending_request.args else None
        keys = getattr(forwarded, "affinity", ())
        if not keys or len(candidate_replicas) < 2:
            return await super().choose_replicas(candidate_replicas, pending_request)
        served = {r.replica_id.unique_id: (r.routing_stats or {}).get("served_keys") for r in candidate_replicas}
        return rank_by_affinity(keys, candidate_replicas, self.index, self._queue_lengths(candidate_replicas),
                                self.load_guard, served)


def request_router_config(*, adapter_load_guard: int = DEFAULT_LOAD_GUARD, load_guard: int = DEFAULT_LOAD_GUARD,
                          index_size: int = 200_000, policy: str = "power_of_two") -> Any:
    """The deployment option that installs this router, with the replicas' stats (the adapters
    each holds, the affinity keys each served) reported often enough that every router knows
    them within seconds."""
    from ray.serve.config import RequestRouterConfig

    return RequestRouterConfig(
        request_router_class=f"{__name__}:ReplicaRouter",
        request_router_kwargs={"adapter_load_guard": adapter_load_guard, "load_guard": load_guard,
                               "index_size": index_size, "policy": policy},
        request_routing_stats_period_s=STATS_PERIOD_S,
        request_routing_stats_timeout_s=STATS_TIMEOUT_S,
    )
