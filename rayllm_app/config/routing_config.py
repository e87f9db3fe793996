"""How the router picks one of a model's replicas: ``deployment_config.routing`` in the model YAML.

- ``power_of_two`` (default): Ray Serve's choice, the shorter queue of two random replicas.
- ``round_robin``: each replica in turn (a baseline for benchmarks/routing.py).
- ``session``: the requests of one session go to one replica, where its KV cache is. A
  session is the ``x-session-id`` header, else the body's ``user``, else (Responses) the chain
  a ``previous_response_id`` continues. Requests without one are routed as ``power_of_two``.
- ``prefix_aware``: requests that share a prompt prefix go to the replica that holds the most
  of it (the less loaded among equals), by prefix-cache affinity on blocks of the prompt;
  Responses continuations as ``session``.

Both keep a load guard: when the preferred replica has more than ``load_guard`` requests
above the least loaded one, the request goes to the least loaded instead (and its prefix is
then remembered there), so a hot prefix or session cannot pile onto one replica. Under
``prefix_aware`` the guard is scaled by the share of the prompt the preferred replica holds
beyond the least loaded one.
See rayllm_app.routing.prefix_affinity.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RoutingPolicy = Literal["power_of_two", "round_robin", "session", "prefix_aware"]
AFFINITY_POLICIES = frozenset({"session", "prefix_aware"})  # the policies that route by affinity keys


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: RoutingPolicy = Field(
        "power_of_two", description="power_of_two (Serve's default), round_robin, session, or prefix_aware.")
    load_guard: int = Field(
        8, ge=0, description="Requests the preferred replica may have above the least loaded one before a "
                             "request goes to the least loaded instead.")
    block_chars: int = Field(
        256, ge=16, le=65536, description="prefix_aware: the prompt is hashed in blocks of this many bytes "
        "of its text (about 64 tokens at 256); only whole blocks count.")
    max_blocks: int = Field(
        512, ge=1, le=65536, description="prefix_aware: blocks hashed per request at most (bounds the "
        "router's work on very long prompts).")
    index_size: int = Field(
        200_000, ge=1, description="prefix_aware: block hashes each router remembers (least recently "
        "used forgotten first).")
