"""Router settings: authentication sources, CORS, request limits and timeouts.

Given as ``args.router`` in a Ray Serve config (or by ``rayllm run`` flags). Keys never
appear here: only where to read them (an environment variable or a file).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# Throughput-optimized Serve behind Ray's HAProxy ingress: the variables Ray reads where each node,
# the controller and the replicas start (rayllm run, the KubeRay pods, benchmarks/router_scaling.py).
FAST_PATH_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


class RouterAutoscaling(BaseModel):
    """Ray Serve autoscaling for the router: replicas follow the requests each one holds open."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, le=64)
    max_replicas: int = Field(4, ge=1, le=64)
    target_ongoing_requests: float = Field(
        64, gt=0, description="Requests in flight per router replica (streams included) that Serve scales "
        "towards; a router replica streams a few hundred at most on one core.")

    @model_validator(mode="after")
    def _ordered(self) -> RouterAutoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys_env: str = Field(
        "RAYLLM_API_KEYS",
        description="Environment variable with keys: 'KEY' or 'KEY:model-a|model-b' entries, comma-separated.")
    api_keys_file: str | None = Field(
        None, description="YAML file: {keys: [{key: ..., name: ..., models: [...]}]} (models optional).")
    protect_metrics: bool = Field(False, description="Require an API key for GET /metrics.")
    cors_allow_origins: list[str] = Field(default_factory=list, description="Empty: no CORS (closed).")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    request_timeout_s: float | None = Field(
        None, gt=0, description="Whole-request limit; a timed-out request is aborted in the engine (504).")
    stream_channel: bool = Field(
        True, description="Model replicas send streamed responses to the router over a direct TCP "
        "connection (one per replica and router) instead of one Ray message per chunk; falls back "
        "to Ray when the replica's node cannot be reached.")
    replicas: int | Literal["per_node"] = Field(
        1, description="Router replicas: a fixed count (1-64), or 'per_node' for one on every node of the "
        "cluster when the application is deployed. Key budgets, stored responses and routing hold across "
        "all of them (limits_store, responses_store). Ignored when autoscaling is set.")
    max_per_node: int | None = Field(
        None, ge=1, description="At most this many router replicas on one node (Serve's max_replicas_per_node), "
        "to spread them over the cluster; 'per_node' implies 1.")
    autoscaling: RouterAutoscaling | None = Field(
        None, description="Scale the routers with their load instead of a fixed count: "
        "{min_replicas, max_replicas, target_ongoing_requests}.")
    limits_store: str | None = Field(
        None, description="Where key budgets and usage history live, shared by every router replica: "
        "unset or 'embedded' for a Ray actor in this cluster (no extra service), or a Redis URL "
        "(redis://host:6379/0, rediss://..., unix://...) for production.")
    limits_store_failure: Literal["open", "closed"] = Field(
        "open", description="When the limits store cannot be reached: 'open' serves without "
        "enforcing budgets (logged), 'closed' answers 503.")
    limits_store_timeout_s: float = Field(0.5, gt=0, le=30, description="How long one store call may take.")
    responses_store: str | None = Field(
        None, description="Where stored Responses (store: true) and their conversations live, shared by "
        "every router and model replica, so a previous_response_id continues on any replica: unset or "
        "'embedded' for a Ray actor with an SQLite file on the head node (responses_file), or a Redis URL.")
    responses_file: str | None = Field(
        None, description="The embedded responses store's file (default ~/.cache/rayllm/responses.sqlite3).")
    responses_ttl_s: float = Field(
        30 * 24 * 3600.0, gt=0, description="How long a stored response is kept (OpenAI: 30 days).")
    low_priority_share: float = Field(
        0.75, gt=0, le=1, description="Share of a model's engine batch slots (max_num_seqs x replicas) "
        "that low-priority keys may hold; past it they wait at the router, so normal and high "
        "requests find a free slot at once.")
    low_priority_wait_s: float = Field(
        60.0, gt=0, description="How long a low-priority request may wait for a slot before its 429.")
    propagate_env: list[str] = Field(
        default_factory=lambda: ["RAYLLM_API_KEYS"],
        description="Variables copied from the building environment into the router's replicas.")

    @field_validator("replicas")
    @classmethod
    def _replica_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("use a count from 1 to 64, or 'per_node'")
        return value

    @field_validator("responses_store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "embedded" or value.startswith(("redis://", "rediss://", "unix://")):
            return value
        raise ValueError("use 'embedded' (or leave it unset) or a Redis URL: redis://host:port/db, "
                         "rediss://host:port/db or unix:///path/to/redis.sock")

    def responses_store_args(self) -> dict[str, object]:
        """``open_response_store``'s arguments, for the router and every model replica."""
        return {"url": self.responses_store, "path": self.responses_file, "ttl_s": self.responses_ttl_s}


def parse_router_replicas(text: str) -> dict[str, object]:
    """A ``--router-replicas`` value as RouterSettings fields: ``N``, ``per-node``, or ``MIN-MAX``
    (autoscaled between them). ValueError says what is accepted."""
    value = text.strip().lower()
    if value in ("per-node", "per_node"):
        return {"replicas": "per_node"}
    low, dash, high = value.partition("-")
    if low.isdigit() and (not dash or high.isdigit()):
        if dash:
            return {"autoscaling": {"min_replicas": int(low), "max_replicas": int(high)}}
        return {"replicas": int(low)}
    raise ValueError(f"{text!r}: use a count (2), 'per-node', or a range to autoscale in (1-4)")


def router_replicas_arg(text: str) -> dict[str, object]:
    """``parse_router_replicas`` as an argparse ``type`` (its message, not argparse's generic one)."""
    import argparse

    try:
        return parse_router_replicas(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
