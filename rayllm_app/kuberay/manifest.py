"""Build the KubeRay ``RayService`` manifest (a dict) for model YAMLs; see ``rayllm_app.kuberay``."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pydantic import ValidationError

from rayllm_app.config import ConfigError, ModelConfig, format_validation_error, load_model_entries
from rayllm_app.config.router_settings import FAST_PATH_ENV, RouterSettings
from rayllm_app.kuberay.groups import (
    GPU_RESOURCE,
    IMPORT_PATH,
    ModelPlan,
    PodShape,
    WorkerGroupPlan,
    check_worker_groups,
    format_resources_param,
    plan_model,
    plan_worker_groups,
)

logger = logging.getLogger("rayllm_app.kuberay")

API_VERSION = "ray.io/v1"
KIND = "RayService"
APP_NAME = "rayllm"
DEFAULT_NAME = "rayllm"
DEFAULT_HTTP_PORT = 8000
DEFAULT_CPU_IMAGE = "rayllm-app:cpu"
DEFAULT_GPU_IMAGE = "rayllm-app:gpu"
DEFAULT_IDLE_TIMEOUT_S = 60
CACHE_DIR = "/data/cache"  # an emptyDir on every worker: converted/mirrored weights, HF cache
REVISION_ANNOTATION = "rayllm.io/revision"
# Two routers: losing one (its pod, or a crash) loses only the requests it held.
DEFAULT_ROUTER_REPLICAS = 2
# The fast path (FAST_PATH_ENV) on every pod: HAProxy listens on the serve port and spreads
# connections over the router replicas of the whole cluster. Ray reads these when each node
# starts, so they are the pods' environment rather than serveConfigV2's.

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
    fast_path: bool = True
    # args.router of the serve config (RouterSettings fields), e.g. replicas, responses_store.
    router: dict[str, Any] = field(default_factory=lambda: {"replicas": DEFAULT_ROUTER_REPLICAS})


# ---------------------------------------------------------------- loading


def load_model_sources(sources: list[str | Path | dict[str, Any]]) -> list[tuple[str, dict[str, Any], ModelConfig]]:
    """(source name, raw mapping, validated config) of every enabled model; duplicates are errors."""
    loaded = [(entry.source, entry.data, entry.config) for entry in load_model_entries(sources)]
    if not loaded:
        raise ConfigError("No enabled models: pass at least one model config with enabled: true.")
    return loaded


# ---------------------------------------------------------------- manifest



def _fast_path_env(options: RenderOptions) -> list[dict[str, Any]]:
    return [{"name": key, "value": value} for key, value in FAST_PATH_ENV.items()] if options.fast_path else []


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
            # Engines at normal priority: Ray would start workers (and so vLLM) at nice 15.
            {"name": "RAY_worker_niceness", "value": "0"},
            *_fast_path_env(options),
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
    # The router's replicas run here: normal priority, as on the workers.
    container["env"] = [{"name": "RAY_worker_niceness", "value": "0"}, *_fast_path_env(options),
                        *_secret_env(options)]
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
            "args": {**({"router": dict(options.router)} if options.router else {}),
                     "models": [m.raw for m in models]},
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
    try:
        RouterSettings.model_validate(options.router)
    except ValidationError as error:
        raise RenderError(format_validation_error("args.router", error, "router settings")) from None
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
