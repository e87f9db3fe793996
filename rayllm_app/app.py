"""Assemble the Ray Serve application: one deployment per model behind the router.

``build_app`` is the import path Ray Serve configs use::

    applications:
      - name: rayllm
        route_prefix: /
        import_path: rayllm_app.app:build_app
        args:
          models: [models/smollm2-135m-instruct.yaml]   # files, folders or inline mappings
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import ValidationError
from ray.serve.deployment import Application

from rayllm_app.config import (
    ConfigError,
    ModelConfig,
    format_validation_error,
    load_model_configs,
)
from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.replica.deployment import (
    build_model_deployment,
    deployment_name,
    placement_bundles,
)
from rayllm_app.router.ingress import Router
from rayllm_app.storage.model_source import local_context_length


def model_card(config: ModelConfig, created: int) -> dict[str, Any]:
    engine = config.engine_config
    context = local_context_length(config)
    return {
        "id": engine.model_id,
        "created": created,
        "root": engine.model_source,
        "max_model_len": context,
        "metadata": {
            "description": engine.model_description,
            "url": engine.model_url,
            "context_length": context,
            "engine": engine.type,
            "num_workers": config.scaling_config.num_workers,
            "capabilities": config.capabilities(),
        },
    }


def model_spec(config: ModelConfig) -> dict[str, Any]:
    """What the router's status tracker needs to watch this model's deployment."""
    bundles, _ = placement_bundles(config)
    return {
        "model_id": config.model_id,
        "deployment": deployment_name(config.model_id),
        "bundles": bundles,
        "strategy": config.scaling_config.placement_strategy,
        "pg_timeout_s": config.scaling_config.pg_timeout_s,
        "cold_start_timeout_s": config.deployment_config.cold_start_timeout_s,
        "max_n": config.engine_config.generation.max_n,
        "max_ongoing_requests": config.deployment_config.max_ongoing_requests,
        "priority_scheduling": config.engine_config.engine_kwargs.get("scheduling_policy") == "priority",
        "default_max_tokens": config.engine_config.generation.sampling_defaults().get("max_tokens"),
        "max_num_seqs": config.engine_config.engine_kwargs.get("max_num_seqs"),
        "idle_sleep": config.deployment_config.idle_sleep is not None,
        "migration_limit": config.deployment_config.migration_limit,
        "routing": config.deployment_config.routing,
    }


def router_deployment(settings: RouterSettings):
    """The router, with the variables it reads (e.g. API keys) copied into its environment."""
    env_vars = {name: os.environ[name] for name in settings.propagate_env if name in os.environ}
    options: dict[str, Any] = {"num_cpus": 0}
    if env_vars:
        options["runtime_env"] = {"env_vars": env_vars}
    # Our JSON access log (middleware) replaces Serve's per-request line.
    return Router.options(ray_actor_options=options, logging_config={"enable_access_log": False},
                          **router_scaling(settings))


def router_scaling(settings: RouterSettings) -> dict[str, Any]:
    """The router's replica options: a fixed count, one per node, or Serve autoscaling.

    ``per_node`` counts the cluster's alive nodes when the application is built (deployed), and
    allows one router per node: Serve has no per-node deployments, so a cluster that grows
    later gets its extra routers at the next deploy (or use ``autoscaling``)."""
    spread = {"max_replicas_per_node": settings.max_per_node} if settings.max_per_node else {}
    if settings.autoscaling is not None:
        scaling = settings.autoscaling
        return {"autoscaling_config": {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                                       "target_ongoing_requests": scaling.target_ongoing_requests}, **spread}
    if settings.replicas == "per_node":
        import ray

        nodes = sum(1 for node in ray.nodes() if node.get("Alive")) if ray.is_initialized() else 1
        return {"num_replicas": max(1, nodes), "max_replicas_per_node": 1}
    return {"num_replicas": settings.replicas, **spread}


def build_app_from_configs(configs: list[ModelConfig], server_cls: type | None = None,
                           settings: RouterSettings | None = None) -> Application:
    if not configs:
        raise ConfigError("No enabled models to serve: pass at least one model config.")
    settings = settings or RouterSettings()
    created = int(time.time())
    extra = {"server_cls": server_cls} if server_cls is not None else {}
    responses = settings.responses_store_args()
    handles = [build_model_deployment(config, responses=responses, **extra) for config in configs]
    cards = [model_card(config, created) for config in configs]
    lora_models = [config.model_dump(mode="json") for config in configs if config.lora_config is not None]
    return router_deployment(settings).bind(handles, cards, [model_spec(config) for config in configs],
                                            settings.model_dump(), lora_models)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: ``args.models`` lists model files, folders or mappings."""
    models = args.get("models")
    if isinstance(models, (str, dict)):
        models = [models]
    if not models:
        raise ConfigError("build_app needs args.models: a list of model YAML paths, folders or mappings.")
    try:
        settings = RouterSettings.model_validate(args.get("router") or {})
    except ValidationError as error:
        raise ConfigError(format_validation_error("args.router", error, "router settings")) from None
    return build_app_from_configs(load_model_configs(list(models)), settings=settings)
