"""What the router knows about each model's replicas, without waking any of them.

A background task reads Ray Serve's status every second. From it the router answers
``/health`` per model, fails requests fast (503 with the reason) for a model whose
replicas cannot start, bounds how long a request waits for a cold start, and turns a
worker group that stays unschedulable past ``pg_timeout_s`` into an error that names the
missing resource and what the cluster has, instead of a request that hangs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rayllm_app.config.routing_config import RoutingConfig

logger = logging.getLogger(__name__)

READY, STARTING, IDLE, FAILED = "ready", "starting", "scaled_to_zero", "failed"
SLEEPING = "sleeping"


@dataclass
class ModelSpec:
    """What the tracker needs to know about one model's deployment."""

    model_id: str
    deployment: str
    bundles: list[dict[str, float]]
    strategy: str
    pg_timeout_s: float
    cold_start_timeout_s: float
    max_n: int | None = None
    max_ongoing_requests: int | None = None  # per replica: past it, requests queue in Serve
    priority_scheduling: bool = False        # the engine runs scheduling_policy: priority
    default_max_tokens: int | None = None    # the model's generate_kwargs max_tokens
    max_num_seqs: int | None = None          # the engine's batch slots per replica, when set
    idle_sleep: bool = False                 # deployment_config.idle_sleep: replicas may sleep
    migration_limit: int = 0                 # deployment_config.migration_limit (rayllm_app.router.migration)
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # deployment_config.routing


@dataclass
class ModelState:
    state: str = STARTING
    message: str = ""
    running_replicas: int = 0
    sleeping_replicas: int | None = None  # None: the model never sleeps
    target_replicas: int | None = None
    pending_since: float | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def shown(self) -> str:
        """The state clients see: ``sleeping`` when every running replica's engine sleeps (a
        request is still routed to it, and wakes it)."""
        if self.state == READY and self.sleeping_replicas and self.sleeping_replicas >= self.running_replicas:
            return SLEEPING
        return self.state

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.shown, "running_replicas": self.running_replicas}
        if self.sleeping_replicas is not None:
            info["sleeping_replicas"] = self.sleeping_replicas
        if self.message:
            info["message"] = self.message
        return info


def _fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(name, 0.0) + 1e-9 >= amount for name, amount in bundle.items())


def diagnose_unschedulable(spec: ModelSpec, nodes: list[dict[str, float]]) -> str:
    """Say which resource the worker group lacks and what the cluster's nodes have."""
    bundles = spec.bundles
    if spec.strategy == "STRICT_PACK":
        needed: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                needed[name] = needed.get(name, 0.0) + amount
        wanted, scope = [needed], "on one node (STRICT_PACK)"
    else:
        wanted, scope = bundles, f"({spec.strategy}, one bundle per worker)"
    cluster_names = {name for node in nodes for name in node}
    missing = sorted({name for bundle in wanted for name in bundle if name not in cluster_names})
    lines = [f"Model '{spec.model_id}' cannot be scheduled: each replica needs "
             f"{_format(wanted[0]) if len(wanted) == 1 else [_format(b) for b in wanted]} {scope}."]
    if missing:
        lines.append(f"No node in the cluster has the resource(s) {', '.join(missing)}"
                     " (check scaling_config.accelerator_type / resources_per_worker).")
    elif not any(all(_fits(b, node) for b in wanted) for node in nodes):
        lines.append("No node is large enough for it (check num_gpus_per_worker, num_cpus_per_worker "
                     "and placement_strategy).")
    else:
        lines.append("The nodes that could hold it are busy; add capacity or lower other models' replicas.")
    nodes_text = "; ".join(_format(node) for node in nodes) or "no nodes"
    lines.append(f"The cluster's nodes have: {nodes_text}.")
    return " ".join(lines)


def _format(resources: dict[str, float]) -> str:
    shown = {k: (int(v) if float(v).is_integer() else round(v, 3)) for k, v in sorted(resources.items())
             if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{k}: {v}" for k, v in shown.items()) + "}"


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


@dataclass
class DeploymentOverview:
    status: str
    message: str
    replica_states: dict[str, int]


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _read_cluster_state(app_name: str) -> tuple[dict[str, DeploymentOverview], list[str]]:
    """The app's deployments and the names of placement groups still waiting for resources.

    Reads the controller's plain details dict: ``serve.status()`` builds pydantic models
    from it, about 13 ms of the router's CPU per poll against 1 ms.
    """
    from ray.serve.context import _get_global_client
    from ray.util import placement_group_table

    waiting = [info.get("name", "") for info in placement_group_table().values()
               if info.get("state") in ("PENDING", "RESCHEDULING")]
    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(app_name) or {}
    deployments = {}
    for name, deployment in (app.get("deployments") or {}).items():
        counts: dict[str, int] = {}
        for replica in deployment.get("replicas") or ():
            state = _name(replica.get("state"))
            counts[state] = counts.get(state, 0) + 1
        deployments[name] = DeploymentOverview(_name(deployment.get("status")), deployment.get("message") or "",
                                               counts)
    return deployments, waiting


def _sleeping_counts(deployments: list[str]) -> dict[str, int]:
    """How many replicas of each deployment report a sleeping engine (replica.sleep_registry)."""
    from rayllm_app.replica.sleep_registry import read_states

    return {name: sum(state == "sleeping" for state in read_states(name).values()) for name in deployments}


def _short_error(message: str) -> str:
    """Ray's deploy-failure messages carry a full traceback; keep the exception line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and ":" in line and not line.startswith("File "):
            return line
    return lines[-1] if lines else message


class ModelStatusTracker:
    def __init__(self, app_name: str, specs: list[ModelSpec], poll_interval_s: float = 1.0,
                 router_deployment: str | None = None, routers: int = 1,
                 on_routers: Callable[[int], None] | None = None) -> None:
        self.app_name = app_name
        self.specs = {spec.model_id: spec for spec in specs}
        self.states = {spec.model_id: ModelState() for spec in specs}
        self.poll_interval_s = poll_interval_s
        # The router's running replicas (it may autoscale): each router takes its share of the
        # models' capacity and of the key budgets' local headroom.
        self.router_deployment = router_deployment
        self.routers = max(routers, 1)
        self.on_routers = on_routers
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep tracking through controller hiccups
                logger.exception("Could not read Ray Serve status")
            await asyncio.sleep(self.poll_interval_s)

    async def refresh(self) -> None:
        deployments, waiting_groups = await asyncio.to_thread(_read_cluster_state, self.app_name)
        routers = deployments.get(self.router_deployment) if self.router_deployment else None
        if routers is not None:
            count = max(routers.replica_states.get("RUNNING", 0), 1)
            if count != self.routers:
                self.routers = count
                if self.on_routers is not None:
                    self.on_routers(count)
        nodes: list[dict[str, float]] | None = None
        now = time.monotonic()
        for model_id, spec in self.specs.items():
            overview = deployments.get(spec.deployment)
            if overview is None:
                continue
            waiting = any(f"#{spec.deployment}#" in name for name in waiting_groups)
            nodes = self._update(self.states[model_id], spec, overview, now, nodes, waiting)
        sleepy = [spec for spec in self.specs.values() if spec.idle_sleep]
        if sleepy:
            counts = await asyncio.to_thread(_sleeping_counts, [spec.deployment for spec in sleepy])
            for spec in sleepy:
                state = self.states[spec.model_id]
                state.sleeping_replicas = min(counts.get(spec.deployment, 0), state.running_replicas)

    def _update(self, state: ModelState, spec: ModelSpec, overview: DeploymentOverview, now: float,
                nodes: list[dict[str, float]] | None, waiting_for_resources: bool
                ) -> list[dict[str, float]] | None:
        counts = overview.replica_states
        running = counts.get("RUNNING", 0)
        pending = counts.get("STARTING", 0) + counts.get("RECOVERING", 0)
        deployment_status = overview.status
        state.running_replicas = running
        if running:
            state.state, state.message, state.pending_since = READY, "", None
            state.ready.set()
            return nodes
        state.ready.clear()
        if deployment_status == "DEPLOY_FAILED" or (deployment_status == "UNHEALTHY" and not pending):
            state.state = FAILED
            state.message = _short_error(overview.message) or "the model's replicas failed to start"
            return nodes
        if not pending:
            state.state, state.message, state.pending_since = IDLE, "", None
            return nodes
        if not waiting_for_resources:  # the worker group is placed: the engine is starting
            state.state, state.message, state.pending_since = STARTING, "", None
            return nodes
        state.pending_since = state.pending_since or now
        if now - state.pending_since >= spec.pg_timeout_s:
            nodes = nodes if nodes is not None else _node_resources()
            state.state = FAILED
            state.message = diagnose_unschedulable(spec, nodes)
        elif state.state != FAILED:
            state.state = STARTING
        return nodes

    def state(self, model_id: str) -> ModelState:
        return self.states[model_id]

    def health(self) -> dict[str, Any]:
        models = {model_id: state.describe() for model_id, state in self.states.items()}
        degraded = any(state.state == FAILED for state in self.states.values())
        return {"status": "degraded" if degraded else "ok", "models": models}
