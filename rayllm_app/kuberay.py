"""Render a KubeRay ``RayService`` manifest (apiVersion ray.io/v1) from model YAMLs.

``rayllm kuberay render --model models/a.yaml [--model ...] [--image ...] [-o FILE]``

The manifest is self-contained: every model config is embedded inline in
``spec.serveConfigV2`` (as the ``args.models`` list of ``rayllm_app.app:build_app``), so
the image needs the package but no YAML files. Worker groups are sized from each
model's worker group, exactly as ``placement_bundles()`` reserves it on Ray:

* STRICT_PACK / PACK: all bundles of a replica land on one node, so one pod must hold
  their sum (GPUs per pod = num_gpus_per_worker x num_workers, plus the CPUs of the
  replica and of every worker);
* SPREAD / STRICT_SPREAD: one pod per bundle, sized for the largest bundle.

Models whose pods have the same shape share a worker group. ``accelerator_type`` becomes
the Ray resource ``accelerator_type:<X>`` in the group's ``rayStartParams`` (so Ray, and
the autoscaler when it scales a group up from zero, know what the pod carries) and a
Kubernetes node selector for the GPU product (label scheme chosen with
``--accelerator-label``). The head starts with ``num-cpus: "0"`` so no replica lands on
it. With autoscaling (default when any model needs GPUs) KubeRay's in-tree autoscaler
runs and every worker group starts at, and may shrink to, 0 pods.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayllm_app.config import ConfigError, ModelConfig, expand_model_paths, parse_model_config

logger = logging.getLogger(__name__)

API_VERSION = "ray.io/v1"
KIND = "RayService"
APP_NAME = "rayllm"
IMPORT_PATH = "rayllm_app.app:build_app"
DEFAULT_NAME = "rayllm"
DEFAULT_HTTP_PORT = 8000
DEFAULT_CPU_IMAGE = "rayllm-app:cpu"
DEFAULT_GPU_IMAGE = "rayllm-app:gpu"
DEFAULT_IDLE_TIMEOUT_S = 60
GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_PREFIX = "accelerator_type:"
CACHE_DIR = "/data/cache"  # an emptyDir on every worker: converted/mirrored weights, HF cache
REVISION_ANNOTATION = "rayllm.io/revision"

# Ray accelerator_type (ray.util.accelerators) -> node label value, per labelling scheme.
ACCELERATOR_LABELS: dict[str, tuple[str, dict[str, str]] | None] = {
    # NVIDIA GPU Feature Discovery (GPU operator / device plugin with GFD): any cloud or on-prem.
    "nvidia": ("nvidia.com/gpu.product", {
        "A10G": "NVIDIA-A10G", "L4": "NVIDIA-L4", "L40S": "NVIDIA-L40S", "T4": "Tesla-T4",
        "V100": "Tesla-V100-SXM2-16GB", "A100": "NVIDIA-A100-SXM4-40GB",
        "A100-40G": "NVIDIA-A100-SXM4-40GB", "A100-80G": "NVIDIA-A100-SXM4-80GB",
        "H100": "NVIDIA-H100-80GB-HBM3", "H200": "NVIDIA-H200", "B200": "NVIDIA-B200",
        "P100": "Tesla-P100-PCIE-16GB", "P4": "Tesla-P4", "K80": "Tesla-K80",
    }),
    # GKE GPU node pools.
    "gke": ("cloud.google.com/gke-accelerator", {
        "L4": "nvidia-l4", "T4": "nvidia-tesla-t4", "V100": "nvidia-tesla-v100",
        "P100": "nvidia-tesla-p100", "P4": "nvidia-tesla-p4", "A100": "nvidia-tesla-a100",
        "A100-40G": "nvidia-tesla-a100", "A100-80G": "nvidia-a100-80gb", "H100": "nvidia-h100-80gb",
        "H200": "nvidia-h200-141gb", "B200": "nvidia-b200", "RTX-PRO-6000": "nvidia-rtx-pro-6000",
    }),
    # EKS nodes provisioned by Karpenter.
    "karpenter": ("karpenter.k8s.aws/instance-gpu-name", {
        "A10G": "a10g", "L4": "l4", "L40S": "l40s", "T4": "t4", "V100": "v100", "A100": "a100",
        "A100-40G": "a100", "A100-80G": "a100", "H100": "h100", "H200": "h200", "B200": "b200",
    }),
    "none": None,
}


class RenderError(ValueError):
    """The models cannot be turned into a RayService (the message says why and what to do)."""


@dataclass
class RenderOptions:
    name: str = DEFAULT_NAME
    namespace: str | None = None
    image: str | None = None  # default: rayllm-app:gpu if any model needs GPUs, else rayllm-app:cpu
    http_port: int = DEFAULT_HTTP_PORT
    autoscaling: bool | None = None  # default: on when any model needs GPUs
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S
    s3_secret: str | None = None
    hf_token_secret: str | None = None
    service_account: str | None = None
    accelerator_label: str = "nvidia"
    node_selector: dict[str, str] = field(default_factory=dict)
    worker_memory: str | None = None
    head_cpu: str | None = None
    head_memory: str | None = None
    revision: str | None = None
    proxy_location: str = "EveryNode"


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


# ---------------------------------------------------------------- loading and sizing


def load_model_sources(sources: list[str | Path | dict[str, Any]]) -> list[tuple[str, dict[str, Any], ModelConfig]]:
    """(source name, raw mapping, validated config) of every enabled model; duplicates are errors."""
    items: list[tuple[str, Any]] = []
    for source in sources:
        if isinstance(source, dict):
            items.append(("<inline>", source))
            continue
        for path in expand_model_paths([source]):
            try:
                data = yaml.safe_load(Path(path).read_text())
            except OSError as error:
                raise ConfigError(f"{path}: cannot read model config ({error.strerror})") from None
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {error}") from None
            items.append((str(path), data))
    loaded: list[tuple[str, dict[str, Any], ModelConfig]] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for name, data in items:
        try:
            config = parse_model_config(data, name)
        except ConfigError as error:
            errors.append(str(error))
            continue
        if not config.enabled:
            logger.info("Skipping %s: enabled is false", name)
            continue
        if config.model_id in seen:
            errors.append(f"{name}: engine_config.model_id '{config.model_id}' is also used by {seen[config.model_id]}")
            continue
        seen[config.model_id] = name
        loaded.append((name, data, config))
    if errors:
        raise ConfigError("\n".join(errors))
    if not loaded:
        raise ConfigError("No enabled models: pass at least one model config with enabled: true.")
    return loaded


def replica_bundles(config: ModelConfig) -> list[dict[str, float]]:
    """The placement-group bundles one replica of this model reserves (see model_deployment)."""
    from rayllm_app.model_deployment import placement_bundles

    # placement_bundles also resolves propagate_env against *this* process's environment and
    # warns about unset names; that is meaningless when only rendering a manifest.
    deployment_logger = logging.getLogger("rayllm_app.model_deployment")
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


# ---------------------------------------------------------------- manifest


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


def _secret_env(options: RenderOptions) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if options.s3_secret:
        for key, optional in (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                              ("AWS_SESSION_TOKEN", True), ("AWS_REGION", True), ("AWS_ENDPOINT_URL_S3", True)):
            ref: dict[str, Any] = {"name": options.s3_secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if options.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": options.hf_token_secret, "key": "HF_TOKEN", "optional": True}}})
    return env


def _node_selector(shape: PodShape, options: RenderOptions) -> dict[str, str]:
    selector: dict[str, str] = {}
    scheme = ACCELERATOR_LABELS.get(options.accelerator_label, "missing")
    if scheme == "missing":
        raise RenderError(f"unknown --accelerator-label {options.accelerator_label!r}; "
                          f"choose one of {sorted(ACCELERATOR_LABELS)}")
    if shape.gpus and shape.accelerator_type and scheme is not None:
        key, values = scheme
        value = values.get(shape.accelerator_type)
        if value is None:
            raise RenderError(
                f"accelerator_type {shape.accelerator_type!r} has no known {key} label value "
                f"(known: {', '.join(sorted(values))}); pass --accelerator-label none and "
                f"--node-selector KEY=VALUE to select its nodes yourself")
        selector[key] = value
    selector.update(options.node_selector)
    return selector


def _quantity_gib(value: int) -> str:
    return f"{value}Gi"


def worker_group_spec(group: WorkerGroupPlan, options: RenderOptions, image: str,
                      autoscaling: bool) -> dict[str, Any]:
    shape = group.shape
    params: dict[str, str] = {"num-cpus": str(shape.cpus)}
    if shape.gpus:
        params["num-gpus"] = str(shape.gpus)
    resources = shape.ray_resources()
    if resources:
        params["resources"] = format_resources_param(resources)
    memory = options.worker_memory or _quantity_gib(shape.memory_gib)
    limits: dict[str, str] = {"cpu": str(shape.cpus), "memory": memory}
    if shape.gpus:
        limits[GPU_RESOURCE] = str(shape.gpus)
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        # Serve proxies run on workers with replicas too (proxy_location EveryNode); KubeRay
        # probes them and routes <name>-serve-svc to them on the port named "serve".
        "ports": [{"containerPort": options.http_port, "name": "serve"}],
        "env": [
            {"name": "RAYLLM_CACHE_DIR", "value": f"{CACHE_DIR}/rayllm"},
            {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
            *_secret_env(options),
        ],
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "model-cache", "mountPath": CACHE_DIR},
        ],
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            # vLLM's tensor-parallel workers (NCCL) and Ray's object store need a real /dev/shm.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "model-cache", "emptyDir": {}},
        ],
    }
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    selector = _node_selector(shape, options)
    if selector:
        pod_spec["nodeSelector"] = selector
    if shape.gpus:
        pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    max_pods = group.max_pods
    min_pods = 0 if autoscaling else max_pods
    return {
        "groupName": group.name,
        "replicas": min_pods,
        "minReplicas": min_pods,
        "maxReplicas": max_pods,
        "rayStartParams": params,
        "template": {"spec": pod_spec},
    }


def head_group_spec(options: RenderOptions, image: str, any_gpu: bool) -> dict[str, Any]:
    cpu = options.head_cpu or ("2" if any_gpu else "1")
    memory = options.head_memory or ("8Gi" if any_gpu else "3Gi")
    limits = {"cpu": cpu, "memory": memory}
    container: dict[str, Any] = {
        "name": "ray-head",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": options.http_port, "name": "serve"},
        ],
    }
    env = _secret_env(options)
    if env:
        container["env"] = env
    pod_spec: dict[str, Any] = {"containers": [container]}
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    template: dict[str, Any] = {"spec": pod_spec}
    if options.revision:
        # Any change here changes rayClusterConfig, which makes KubeRay roll out a new cluster
        # (blue/green, zero downtime) instead of updating Serve in place.
        template["metadata"] = {"annotations": {REVISION_ANNOTATION: options.revision}}
    return {
        # No logical CPUs on the head: every replica lands on a worker.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": template,
    }


def serve_config(models: list[ModelPlan], options: RenderOptions) -> dict[str, Any]:
    return {
        "proxy_location": options.proxy_location,
        "http_options": {"host": "0.0.0.0", "port": options.http_port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"models": [m.raw for m in models]},
        }],
    }


def ray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:  # pragma: no cover - ray is a dependency
        return "2.60.0"


def _warn_about_sources(models: list[ModelPlan], options: RenderOptions) -> None:
    for model in models:
        engine = model.config.engine_config
        source = engine.model_source
        if engine.s3_mirror_config is None and source.startswith(("/", "./", "../", "~")):
            logger.warning("%s: hf_model_id %r is a local path; it must exist in every worker pod",
                           model.source, source)
        if engine.s3_mirror_config is not None and not options.s3_secret and not options.service_account:
            logger.warning("%s: s3_mirror_config without --s3-secret or --service-account: the pods "
                           "need credentials from the node's own role", model.source)


def render_rayservice(sources: list[str | Path | dict[str, Any]],
                      options: RenderOptions | None = None) -> dict[str, Any]:
    """The RayService manifest (a dict) serving these model files, folders or mappings."""
    options = options or RenderOptions()
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", options.name) or len(options.name) > 40:
        raise RenderError(f"--name {options.name!r} must be a DNS label of at most 40 characters "
                          "(KubeRay derives cluster, pod and service names from it)")
    models = [plan_model(name, raw, config) for name, raw, config in load_model_sources(sources)]
    groups = plan_worker_groups(models)
    any_gpu = any(g.shape.gpus for g in groups)
    autoscaling = any_gpu if options.autoscaling is None else options.autoscaling
    image = options.image or (DEFAULT_GPU_IMAGE if any_gpu else DEFAULT_CPU_IMAGE)
    _warn_about_sources(models, options)
    cluster: dict[str, Any] = {"rayVersion": ray_version()}
    if autoscaling:
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": options.idle_timeout_s}
    cluster["headGroupSpec"] = head_group_spec(options, image, any_gpu)
    cluster["workerGroupSpecs"] = [worker_group_spec(g, options, image, autoscaling) for g in groups]
    metadata: dict[str, Any] = {"name": options.name}
    if options.namespace:
        metadata["namespace"] = options.namespace
    metadata["labels"] = {"app.kubernetes.io/name": "rayllm", "app.kubernetes.io/instance": options.name}
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            # A changed rayClusterConfig is rolled out on a new cluster; traffic switches
            # once the new cluster's Serve application is healthy.
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(serve_config(models, options), sort_keys=False,
                                            width=1000, allow_unicode=True),
            "rayClusterConfig": cluster,
        },
    }
    problems = check_worker_groups(manifest)
    if problems:  # pragma: no cover - the sizing above is meant to make this impossible
        raise RenderError("rendered worker groups cannot hold every model:\n  " + "\n  ".join(problems))
    return manifest


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


# ---------------------------------------------------------------- YAML output and CLI


class _ManifestDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_ManifestDumper.add_representer(str, _represent_str)


def dump_manifest(manifest: dict[str, Any], header: list[str] | None = None) -> str:
    body = yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=1000, allow_unicode=True)
    lines = [f"# {line}".rstrip() for line in header or []]
    return "\n".join(lines + [body]) if lines else body


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, type=Path,
                        help="model YAML file or folder of them (repeatable); embedded inline")
    parser.add_argument("--image", default=None,
                        help=f"container image (default: {DEFAULT_GPU_IMAGE} if any model needs GPUs, "
                             f"else {DEFAULT_CPU_IMAGE})")
    parser.add_argument("--name", default=DEFAULT_NAME, help="RayService name (default: %(default)s)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--output", "-o", default=None, help="write here instead of stdout")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="Serve HTTP port (default: 8000)")
    parser.add_argument("--autoscaling", action=argparse.BooleanOptionalAction, default=None,
                        help="KubeRay in-tree autoscaler; worker groups scale between 0 and their maximum "
                             "(default: on when any model needs GPUs)")
    parser.add_argument("--idle-timeout", type=int, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="seconds an idle worker pod lives before the autoscaler removes it")
    parser.add_argument("--s3-secret", default=None,
                        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (optional: AWS_SESSION_TOKEN, "
                             "AWS_REGION, AWS_ENDPOINT_URL_S3) for s3_mirror_config")
    parser.add_argument("--hf-token-secret", default=None, help="Secret with key HF_TOKEN (gated Hub models)")
    parser.add_argument("--service-account", default=None,
                        help="pods' service account (IRSA on EKS, Workload Identity on GKE)")
    parser.add_argument("--accelerator-label", choices=sorted(ACCELERATOR_LABELS), default="nvidia",
                        help="node label that selects a model's accelerator_type: nvidia = nvidia.com/gpu.product "
                             "(GPU operator), gke = cloud.google.com/gke-accelerator, karpenter = "
                             "karpenter.k8s.aws/instance-gpu-name, none (default: %(default)s)")
    parser.add_argument("--node-selector", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="extra node selector for every worker group (repeatable)")
    parser.add_argument("--worker-memory", default=None,
                        help="memory of every worker pod, e.g. 64Gi (default: 16Gi per GPU + 1Gi per CPU; "
                             "CPU-only pods 1Gi + 2Gi per CPU)")
    parser.add_argument("--head-cpu", default=None, help="head pod CPUs (default: 2 with GPUs, else 1)")
    parser.add_argument("--head-memory", default=None, help="head pod memory (default: 8Gi with GPUs, else 3Gi)")
    parser.add_argument("--revision", default=None,
                        help="annotation on the head pod; a new value makes KubeRay upgrade on a new cluster")


def options_from_args(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions(
        name=args.name, namespace=args.namespace, image=args.image, http_port=args.http_port,
        autoscaling=args.autoscaling, idle_timeout_s=args.idle_timeout, s3_secret=args.s3_secret,
        hf_token_secret=args.hf_token_secret, service_account=args.service_account,
        accelerator_label=args.accelerator_label, node_selector=dict(args.node_selector),
        worker_memory=args.worker_memory, head_cpu=args.head_cpu, head_memory=args.head_memory,
        revision=args.revision,
    )


def command_line(args: argparse.Namespace) -> str:
    """The canonical `rayllm kuberay render` command for these arguments (non-defaults only)."""
    words = ["rayllm", "kuberay", "render"]
    for path in args.model:
        words += ["--model", str(path)]
    simple = [("--image", args.image, None), ("--name", args.name, DEFAULT_NAME),
              ("--namespace", args.namespace, None), ("--http-port", args.http_port, DEFAULT_HTTP_PORT),
              ("--idle-timeout", args.idle_timeout, DEFAULT_IDLE_TIMEOUT_S),
              ("--s3-secret", args.s3_secret, None), ("--hf-token-secret", args.hf_token_secret, None),
              ("--service-account", args.service_account, None),
              ("--accelerator-label", args.accelerator_label, "nvidia"),
              ("--worker-memory", args.worker_memory, None), ("--head-cpu", args.head_cpu, None),
              ("--head-memory", args.head_memory, None), ("--revision", args.revision, None)]
    for flag, value, default in simple:
        if value != default:
            words += [flag, str(value)]
    if args.autoscaling is not None:
        words.append("--autoscaling" if args.autoscaling else "--no-autoscaling")
    for key, value in args.node_selector:
        words += ["--node-selector", f"{key}={value}"]
    if args.output:
        words += ["--output", str(args.output)]
    return shlex.join(words)


def render_from_args(args: argparse.Namespace) -> str:
    """The manifest text `rayllm kuberay render` writes for these arguments."""
    manifest = render_rayservice(list(args.model), options_from_args(args))
    models = ", ".join(m.get("engine_config", {}).get("model_id", "?") for m in manifest_models(manifest))
    header = [
        f"RayService {manifest['metadata']['name']} serving: {models}",
        "Generated by `rayllm kuberay render`; the model configs are embedded in serveConfigV2.",
        "Regenerate (do not edit by hand):",
        f"  {command_line(args)}",
    ]
    return dump_manifest(manifest, header)


def cmd_render(args: argparse.Namespace) -> int:
    try:
        text = render_from_args(args)
    except (ConfigError, RenderError) as error:
        print(error, file=sys.stderr)
        return 2
    if args.output and str(args.output) != "-":
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """`rayllm kuberay render ...` (called from rayllm_app.cli.build_parser)."""
    kuberay = sub.add_parser("kuberay", help="KubeRay (Kubernetes) manifests for model YAMLs")
    commands = kuberay.add_subparsers(dest="kuberay_command", required=True)
    render = commands.add_parser(
        "render", help="write a RayService manifest serving the given model YAMLs",
        description="Write a KubeRay RayService manifest (apiVersion ray.io/v1) serving the given model "
        "YAMLs: the configs embedded in serveConfigV2, worker groups sized from each model's "
        "scaling_config. See kuberay/README.md.")
    add_arguments(render)
    render.set_defaults(func=cmd_render)
