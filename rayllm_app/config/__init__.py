"""Configuration: the model YAML and the router settings. Beneath every other layer: nothing
here imports the router, the replica or the engine.

* :mod:`~rayllm_app.config.schema` - the model file's pydantic schema (``ModelConfig``, ...)
* :mod:`~rayllm_app.config.loader` - files, folders and inline mappings into validated configs
* :mod:`~rayllm_app.config.rayllm_compat` - RayLLM's pre-vLLM sections and spellings
* :mod:`~rayllm_app.config.prompt_format` - RayLLM prompt formats compiled to chat templates
* :mod:`~rayllm_app.config.s3_config` - ``engine_config.s3_mirror_config``
* :mod:`~rayllm_app.config.router_settings` - ``args.router`` (keys, CORS, limits, timeouts, budget store)
* :mod:`~rayllm_app.config.key_config` - the API keys file (allow-lists, budgets, priority, admin)

The common names are re-exported here: ``from rayllm_app.config import ModelConfig``.
"""

from __future__ import annotations

from rayllm_app.config.loader import (
    ModelEntry,
    expand_model_paths,
    format_validation_error,
    load_model_config,
    load_model_configs,
    load_model_entries,
    log_ignored_settings,
    parse_model_config,
    read_model_file,
)
from rayllm_app.config.lora_config import LoraAdapter, LoraConfig, adapter_id
from rayllm_app.config.prompt_format import PromptFormat
from rayllm_app.config.rayllm_compat import SchedulerConfig, SchedulerPolicy
from rayllm_app.config.schema import (
    BUILTIN_PREFIX,
    CAPABILITIES,
    FRONTEND_OPTIONS,
    AutoscalingConfig,
    ConfigError,
    DeploymentConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    ScalingConfig,
    vllm_engine_arg_names,
)

__all__ = [
    "BUILTIN_PREFIX",
    "CAPABILITIES",
    "FRONTEND_OPTIONS",
    "AutoscalingConfig",
    "ConfigError",
    "DeploymentConfig",
    "EngineConfig",
    "GenerationConfig",
    "LoraAdapter",
    "LoraConfig",
    "ModelConfig",
    "ModelEntry",
    "PromptFormat",
    "ScalingConfig",
    "SchedulerConfig",
    "SchedulerPolicy",
    "adapter_id",
    "expand_model_paths",
    "format_validation_error",
    "load_model_config",
    "load_model_configs",
    "load_model_entries",
    "log_ignored_settings",
    "parse_model_config",
    "read_model_file",
    "vllm_engine_arg_names",
]
