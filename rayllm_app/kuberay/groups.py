"""Worker groups for a KubeRay RayService: sizing them from models, checking a manifest's fit.

Sizing (``plan_model``, ``plan_worker_groups``) follows how ``placement_bundles()`` reserves
a replica's worker group on Ray; see ``rayllm_app.kuberay`` for the rules. Checking
(``check_worker_groups``) reads a rendered manifest back, as KubeRay would start its pods,
and reports every model whose bundles no group's pod can hold.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from rayllm_app.config import ModelConfig, parse_model_config

IMPORT_PATH = "rayllm_app.app:build_app"
GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_PREFIX = "accelerator_type:"


@dataclass(frozen=True)
class PodShape:
    """What one worker pod offers Ray (and requests from Kubernetes)."""

    cpus: int
    gpus: int
    memory_gib: int
    accelerator_type: str | None
    custom: tuple[tuple[str, int], ...] = ()

    def ray_resources(self) -> dict[str, int]:
        resources = dict(self.custom)
        if self.accelerator_type:
            resources[ACCELERATOR_PREFIX + self.accelerator_type] = 1
        return resources

    def default_group_name(self) -> str:
        if self.gpus:
            return _dns_label(f"gpu-{self.accelerator_type or 'any'}-x{self.gpus}")
        return _dns_label(f"cpu-x{self.cpus}")


@dataclass
class ModelPlan:
    source: str
    raw: dict[str, Any]
    config: ModelConfig
    bundles: list[dict[str, float]]
    strategy: str
    pods_per_replica: int
    shape: PodShape


@dataclass
class WorkerGroupPlan:
    name: str
    shape: PodShape
    models: list[ModelPlan]

    @property
    def max_pods(self) -> int:
        return max(1, sum(m.pods_per_replica * m.config.deployment_config.autoscaling_config.max_replicas
                          for m in self.models))


# ---------------------------------------------------------------- sizing


def replica_bundles(config: ModelConfig) -> list[dict[str, float]]:
    """The placement-group bundles one replica of this model reserves (see rayllm_app.replica.deployment)."""
    from rayllm_app.replica.deployment import placement_bundles

    # placement_bundles also resolves propagate_env against *this* process's environment and
    # warns about unset names; that is meaningless when only rendering a manifest.
    deployment_logger = logging.getLogger("rayllm_app.replica.deployment")
    level = deployment_logger.level
    deployment_logger.setLevel(logging.ERROR)
    try:
        bundles, _ = placement_bundles(config)
    finally:
        deployment_logger.setLevel(level)
    return bundles


def _sum_bundles(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _max_bundle(bundles: list[dict[str, float]]) -> dict[str, float]:
    biggest: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            biggest[key] = max(biggest.get(key, 0.0), value)
    return biggest


def _ceil(value: float) -> int:
    return int(math.ceil(round(value, 6)))


def plan_model(source: str, raw: dict[str, Any], config: ModelConfig) -> ModelPlan:
    bundles = replica_bundles(config)
    strategy = config.scaling_config.placement_strategy
    if strategy in ("STRICT_PACK", "PACK"):
        # STRICT_PACK must, and PACK prefers to, put every bundle of a replica on one node.
        need, pods_per_replica = _sum_bundles(bundles), 1
    else:
        need, pods_per_replica = _max_bundle(bundles), len(bundles)
    accelerator = config.scaling_config.accelerator_type or config.deployment_config.ray_actor_options.get(
        "accelerator_type")
    custom = tuple(sorted(
        (key, max(1, _ceil(value))) for key, value in need.items()
        if key not in ("CPU", "GPU", "memory", "object_store_memory") and not key.startswith(ACCELERATOR_PREFIX)
        and value > 0
    ))
    cpus = max(1, _ceil(need.get("CPU", 0.0)))
    gpus = _ceil(need.get("GPU", 0.0))
    actor_memory = config.deployment_config.ray_actor_options.get("memory") or 0
    memory_gib = default_memory_gib(cpus, gpus) + _ceil(float(actor_memory) / 2**30)
    shape = PodShape(cpus=cpus, gpus=gpus, memory_gib=memory_gib, accelerator_type=accelerator, custom=custom)
    return ModelPlan(source, raw, config, bundles, strategy, pods_per_replica, shape)


def default_memory_gib(cpus: int, gpus: int) -> int:
    """Pod memory when nothing says otherwise: 16 GiB per GPU (host-side weight loading) plus
    1 GiB per CPU; CPU-only pods 1 GiB plus 2 GiB per CPU (weights, KV cache, runtime in RAM)."""
    if gpus:
        return 16 * gpus + cpus
    return 1 + 2 * cpus


def plan_worker_groups(models: list[ModelPlan]) -> list[WorkerGroupPlan]:
    """One worker group per distinct pod shape, in the order models first need them."""
    groups: list[WorkerGroupPlan] = []
    by_shape: dict[PodShape, WorkerGroupPlan] = {}
    used_names: set[str] = set()
    for model in models:
        group = by_shape.get(model.shape)
        if group is None:
            base = model.shape.default_group_name()
            name, n = base, 2
            while name in used_names:
                name, n = f"{base}-{n}", n + 1
            used_names.add(name)
            group = by_shape[model.shape] = WorkerGroupPlan(name, model.shape, [])
            groups.append(group)
        group.models.append(model)
    return groups


def _dns_label(text: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:63].rstrip("-") or "x"


def format_resources_param(resources: dict[str, float]) -> str:
    """rayStartParams ``resources`` as KubeRay documents it: a shell-quoted JSON object."""
    return '"' + json.dumps(resources, sort_keys=True).replace('"', '\\"') + '"'


def parse_resources_param(value: str) -> dict[str, float]:
    """Inverse of format_resources_param (KubeRay passes the value through a shell)."""
    words = shlex.split(value)
    if len(words) != 1:
        raise ValueError(f"rayStartParams.resources {value!r} is not one shell word")
    parsed = json.loads(words[0])
    if not isinstance(parsed, dict):
        raise ValueError(f"rayStartParams.resources {value!r} is not a JSON object")
    return {str(k): float(v) for k, v in parsed.items()}


# ---------------------------------------------------------------- checking a manifest


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ("2", "500m", "16Gi", 3) as a number (bytes for memory)."""
    text = str(value).strip()
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    for suffix, factor in sorted(suffixes.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def group_capacity(group: dict[str, Any]) -> dict[str, float]:
    """The Ray resources one pod of this (head or worker) group offers, as KubeRay starts it."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    limits = (container.get("resources") or {}).get("limits") or {}
    capacity: dict[str, float] = {}
    if "num-cpus" in params:
        capacity["CPU"] = float(params["num-cpus"])
    elif "cpu" in limits:
        capacity["CPU"] = float(math.floor(parse_quantity(limits["cpu"])))
    if "num-gpus" in params:
        capacity["GPU"] = float(params["num-gpus"])
    elif GPU_RESOURCE in limits:
        capacity["GPU"] = parse_quantity(limits[GPU_RESOURCE])
    if "resources" in params:
        capacity.update(parse_resources_param(params["resources"]))
    return capacity


def _fits(need: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(value <= capacity.get(key, 0.0) + 1e-9 for key, value in need.items() if value > 0)


def manifest_models(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    models: list[dict[str, Any]] = []
    for app in serve.get("applications", []):
        if app.get("import_path") == IMPORT_PATH:
            found = (app.get("args") or {}).get("models") or []
            models.extend([found] if isinstance(found, dict) else found)
    return models


def check_worker_groups(manifest: dict[str, Any]) -> list[str]:
    """Problems that would leave a model's worker group unplaceable (empty list: all fit)."""
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [(g["groupName"], group_capacity(g), int(g.get("maxReplicas", 0)))
              for g in cluster.get("workerGroupSpecs") or []]
    groups.append(("head", group_capacity(cluster["headGroupSpec"]), 1))
    problems: list[str] = []
    for raw in manifest_models(manifest):
        if not isinstance(raw, dict):
            problems.append(f"models entry {raw!r} is not an inline mapping")
            continue
        config = parse_model_config(raw, "serveConfigV2")
        if not config.enabled:
            continue
        bundles = replica_bundles(config)
        strategy = config.scaling_config.placement_strategy
        usable = [(name, cap, most) for name, cap, most in groups if most > 0]
        if strategy in ("STRICT_PACK", "PACK"):
            need = _sum_bundles(bundles)
            if not any(_fits(need, cap) for _, cap, _ in usable):
                problems.append(
                    f"model {config.model_id!r}: no group's pod holds its {strategy} worker group {need} "
                    f"(pods offer {[(name, cap) for name, cap, _ in usable]})")
        else:
            for i, bundle in enumerate(bundles):
                if not any(_fits(bundle, cap) for _, cap, _ in usable):
                    problems.append(f"model {config.model_id!r}: bundle {i} {bundle} fits no group's pod")
            if strategy == "STRICT_SPREAD":
                pods = sum(most for _, cap, most in usable if any(_fits(b, cap) for b in bundles))
                if pods < len(bundles):
                    problems.append(f"model {config.model_id!r}: STRICT_SPREAD needs {len(bundles)} pods, "
                                    f"the groups that fit allow {pods}")
    return problems
