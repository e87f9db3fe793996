"""The model YAML schema (one file per model).

Pydantic models here are the single source of truth for what a model file may say.
Field names follow RayLLM's so its YAMLs load unchanged; RayLLM's older spellings
(``max_concurrent_queries``, ``target_num_ongoing_requests_per_replica``) are accepted
and translated. Unknown fields are errors. RayLLM's older, pre-vLLM sections
(``model_init_kwargs``, ``scheduler``, Hugging Face ``generate_kwargs``) are mapped in
:mod:`rayllm_app.config.rayllm_compat`, prompt formats compiled in
:mod:`rayllm_app.config.prompt_format`; files are read by :mod:`rayllm_app.config.loader`.
A model replica builds vLLM's engine from ``EngineConfig.vllm_engine_kwargs()`` and vLLM's
OpenAI app from ``EngineConfig.vllm_frontend_kwargs()``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayllm_app.config.lora_config import LoraConfig, adapter_id
from rayllm_app.config.prompt_format import PromptFormat, chat_template
from rayllm_app.config.rayllm_compat import (
    IGNORED_GENERATE_KWARGS,
    MODEL_INIT_KWARGS_TO_ENGINE,
    SAMPLING_DEFAULT_KEYS,
    VLLM_DTYPES,
    SchedulerConfig,
    model_init_engine_kwargs,
    normalize_generate_kwargs,
    vllm_dtype,
)
from rayllm_app.config.routing_config import RoutingConfig
from rayllm_app.config.s3_config import S3MirrorConfig

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# Engine arguments that the model file sets through its own fields instead.
MANAGED_ENGINE_ARGS = {
    "model": "engine_config.hf_model_id",
    "served_model_name": "engine_config.model_id",
}


# vLLM's OpenAI frontend options (FrontendArgs fields) a model file may set per model in
# engine_config.engine_kwargs, next to the engine arguments; see EngineConfig.vllm_frontend_kwargs.
FRONTEND_OPTIONS = frozenset({
    "chat_template", "chat_template_content_format", "default_chat_template_kwargs", "response_role",
    "return_tokens_as_token_ids", "enable_auto_tool_choice", "exclude_tools_when_tool_choice_none",
    "tool_call_parser", "tool_parser_plugin", "tool_server", "enable_prompt_tokens_details",
    "enable_force_include_usage", "trust_request_chat_template", "max_log_len", "enable_log_outputs",
})

# Normalized defaults that vLLM applies server-side through override_generation_config (its
# generation-config keys, Hugging Face spelled: max_tokens travels as max_new_tokens).
SERVER_SIDE_DEFAULTS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "max_tokens": "max_new_tokens",
}

# ---- what a model serves
Capability = Literal["chat", "completions", "responses", "messages", "embeddings", "score", "tokenize",
                     "tools", "reasoning"]
CAPABILITIES: tuple[str, ...] = get_args(Capability)
GENERATIVE_CAPABILITIES = ("chat", "completions", "responses", "messages", "tokenize")
POOLING_CAPABILITIES = ("embeddings", "score", "tokenize")
# vLLM `convert` values that turn a model into a pooling one (older releases also had "reward").
POOLING_CONVERTS = frozenset({"embed", "classify", "reward"})


class ConfigError(ValueError):
    """A model file is invalid; the message names the file and each bad field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling, with defaults that suit LLM replicas.

    Ray's own default of 2 ongoing requests per replica would add replicas for a load
    one engine batches easily, so the target is 16. Downscaling waits 5 minutes because
    an LLM replica's cold start costs tens of seconds to minutes.
    """

    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)
    smoothing_factor: float = Field(1.0, gt=0)
    upscale_smoothing_factor: float | None = Field(None, gt=0)
    downscale_smoothing_factor: float | None = Field(None, gt=0)
    upscaling_factor: float | None = Field(None, gt=0)
    downscaling_factor: float | None = Field(None, gt=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    downscale_to_zero_delay_s: float | None = Field(None, ge=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    aggregation_function: Literal["mean", "max", "min"] = "mean"
    policy: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _translate_rayllm_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "target_num_ongoing_requests_per_replica" in data:
            data = dict(data)
            value = data.pop("target_num_ongoing_requests_per_replica")
            data.setdefault("target_ongoing_requests", value)
        return data

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class IdleSleepConfig(StrictModel):
    """vLLM's sleep mode for an idle replica: the engine gives its GPU memory back and keeps
    the replica, so the next request waits seconds (a wake) instead of minutes (a cold start)."""

    after_s: float = Field(300.0, gt=0, description="Idle time (no request in flight) before the engine sleeps.")
    level: Literal[1, 2] = Field(
        1, description="1: weights to CPU memory, KV cache dropped (fast wake); 2: both dropped "
        "(weights reloaded from disk on wake).")


class DeploymentConfig(StrictModel):
    """How Ray Serve runs the model's replicas."""

    autoscaling_config: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1, description="-1 means unbounded")
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0)
    graceful_shutdown_wait_loop_s: float = Field(2.0, gt=0)
    max_constructor_retry_count: int = Field(
        3, ge=1, description="Replica start attempts before the model is reported failed.")
    cold_start_timeout_s: float = Field(
        300.0, gt=0, description="How long a request waits for a replica of a model that has none running "
        "(or for a sleeping replica to wake).")
    idle_sleep: IdleSleepConfig | None = Field(
        None, description="Put an idle replica's engine to sleep (GPUs only); a request wakes it.")
    migration_limit: int = Field(
        3, ge=0, description="How many times one request may move to another replica after its replica "
        "died, stalled or lost its engine (streams resume token-exact); past it the client gets the error. "
        "0 turns migration off.")
    stall_timeout_s: float = Field(
        60.0, gt=0, description="A replica whose engine makes no step for this long while requests wait "
        "fails its health check and is replaced; its requests move to another replica.")
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="How a request's replica is chosen (rayllm_app.config.routing_config).")

    @model_validator(mode="before")
    @classmethod
    def _translate_rayllm_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_concurrent_queries" in data:
            data = dict(data)
            data.setdefault("max_ongoing_requests", data.pop("max_concurrent_queries"))
        return data

    @field_validator("ray_actor_options")
    @classmethod
    def _check_actor_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "runtime_env",
                   "object_store_memory", "label_selector"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown ray_actor_options {unknown}; allowed: {sorted(allowed)}")
        return value


class GenerationConfig(StrictModel):
    prompt_format: PromptFormat | None = None
    stopping_sequences: list[str] = Field(default_factory=list)
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_n: int = Field(16, ge=1, le=128, description="Largest `n` a request may ask for.")
    max_logprobs: int = Field(20, ge=0, le=20, description="Largest logprobs / top_logprobs.")

    @field_validator("generate_kwargs")
    @classmethod
    def _check_generate_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - SAMPLING_DEFAULT_KEYS - IGNORED_GENERATE_KWARGS)
        if unknown:
            raise ValueError(
                f"unknown generate_kwargs {unknown}; allowed: {sorted(SAMPLING_DEFAULT_KEYS)} "
                f"(accepted and ignored: {sorted(IGNORED_GENERATE_KWARGS)})"
            )
        for key in ("stop", "stopping_sequences"):
            stop = value.get(key)
            if stop is not None and not isinstance(stop, str) and not (
                    isinstance(stop, list) and all(isinstance(item, str) for item in stop)):
                raise ValueError(f"{key} must be a string or a list of strings, got {stop!r}")
        return value

    def ignored_generate_kwargs(self) -> list[str]:
        """generate_kwargs keys with no vLLM meaning (dropped from the defaults)."""
        return sorted(set(self.generate_kwargs) & IGNORED_GENERATE_KWARGS)

    def sampling_defaults(self) -> dict[str, Any]:
        """generate_kwargs normalized to vLLM's names (see rayllm_compat.normalize_generate_kwargs)."""
        return normalize_generate_kwargs(self.generate_kwargs)

    def server_side_defaults(self) -> dict[str, Any]:
        """The sampling defaults vLLM applies itself, as override_generation_config keys."""
        defaults = self.sampling_defaults()
        return {SERVER_SIDE_DEFAULTS[k]: v for k, v in defaults.items() if k in SERVER_SIDE_DEFAULTS}

    def request_defaults(self) -> dict[str, Any]:
        """The sampling defaults vLLM has no server-side option for (stop, seed, min_tokens,
        ignore_eos, stop_token_ids, skip_special_tokens, include_stop_str_in_output): to be
        filled into each request that leaves them unset. stopping_sequences are not included:
        they are added to every request's stop."""
        return {k: v for k, v in self.sampling_defaults().items() if k not in SERVER_SIDE_DEFAULTS}


class EngineConfig(StrictModel):
    """What to load and how the engine runs it."""

    model_id: str = Field(min_length=1, description="The name clients send as `model`.")
    hf_model_id: str | None = Field(
        None,
        description="Hugging Face id, local folder, or 'builtin:<name>'; defaults to model_id.",
    )
    type: Literal["VLLMEngine", "TRTLLMEngine", "TextGenerationInferenceEngine"] = Field(
        "VLLMEngine", description="RayLLM's engine type; every model is served by vLLM (others are logged).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments (AsyncEngineArgs) and vLLM frontend options (FRONTEND_OPTIONS).")
    max_total_tokens: int | None = Field(None, ge=16, description="Context length (prompt + output).")
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    propagate_env: list[str] = Field(
        default_factory=list,
        description="Names of environment variables (e.g. HF_TOKEN) copied from the environment that "
                    "builds the application into the replicas; their values are never logged.")
    s3_mirror_config: S3MirrorConfig | None = None
    model_description: str = ""
    model_url: str | None = None
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    model_init_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="RayLLM's transformers from_pretrained kwargs: those vLLM has are mapped, others ignored.")
    scheduler: SchedulerConfig | None = Field(
        None, description="RayLLM's TGI-era scheduler: what vLLM has is mapped, the rest ignored.")
    capabilities: list[Capability] | None = Field(
        None, description="What the model serves; derived from engine_kwargs when absent.")

    @field_validator("engine_kwargs")
    @classmethod
    def _check_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, field in MANAGED_ENGINE_ARGS.items():
            if key in value:
                raise ValueError(f"'{key}' is set by {field}, not engine_kwargs")
        valid = vllm_engine_arg_names()
        if valid is not None:
            unknown = sorted(set(value) - valid - FRONTEND_OPTIONS)
            if unknown:
                raise ValueError(
                    f"unknown vLLM engine argument(s) or frontend option(s) {unknown}; valid ones: "
                    f"engine arguments: {', '.join(sorted(valid))}; "
                    f"frontend options: {', '.join(sorted(FRONTEND_OPTIONS))}"
                )
        override = value.get("override_generation_config")
        if override is not None and not isinstance(override, dict):
            raise ValueError(f"override_generation_config must be a mapping, got {override!r}")
        return value

    @field_validator("model_init_kwargs")
    @classmethod
    def _check_model_init_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("torch_dtype", "dtype"):
            if key in value and vllm_dtype(value[key]) not in VLLM_DTYPES:
                raise ValueError(f"{key} {value[key]!r} is not a dtype vLLM loads; one of {list(VLLM_DTYPES)}")
        return value

    @field_validator("capabilities")
    @classmethod
    def _no_duplicate_capabilities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"lists a capability twice: {value}")
        return value

    @model_validator(mode="after")
    def _context_length_agrees(self) -> EngineConfig:
        explicit = self.engine_kwargs.get("max_model_len")
        if explicit is not None and self.max_total_tokens is not None and explicit != self.max_total_tokens:
            raise ValueError(
                f"max_total_tokens ({self.max_total_tokens}) and engine_kwargs.max_model_len "
                f"({explicit}) disagree; set only max_total_tokens"
            )
        legacy = self.scheduler.policy.max_total_tokens if self.scheduler else None
        if legacy is not None and self.max_total_tokens is None and explicit is None:
            self.max_total_tokens = legacy  # RayLLM's scheduler.policy.max_total_tokens: the context length
        return self

    @model_validator(mode="after")
    def _one_chat_template(self) -> EngineConfig:
        if self.generation.prompt_format is not None and "chat_template" in self.engine_kwargs:
            raise ValueError(
                "engine_config.generation.prompt_format and engine_config.engine_kwargs.chat_template are "
                "both set; the prompt format is compiled into a chat template, so set only one")
        return self

    @property
    def model_source(self) -> str:
        return self.hf_model_id or self.model_id

    @property
    def context_length(self) -> int | None:
        return self.max_total_tokens or self.engine_kwargs.get("max_model_len")

    def legacy_engine_kwargs(self) -> dict[str, Any]:
        """Engine arguments mapped from RayLLM's model_init_kwargs and scheduler sections."""
        kwargs = model_init_engine_kwargs(self.model_init_kwargs)
        if self.scheduler is not None:
            kwargs.update(self.scheduler.engine_kwargs())
        return kwargs

    def vllm_engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's AsyncEngineArgs: engine_kwargs without the frontend
        options, over what RayLLM's model_init_kwargs and scheduler map to (explicit
        engine_kwargs win), plus generate_kwargs' server-side defaults in
        override_generation_config (an explicit engine_kwargs.override_generation_config wins
        per key). model, served_model_name and max_model_len are left to the engine adapter."""
        kwargs = self.legacy_engine_kwargs()
        kwargs.update({k: v for k, v in self.engine_kwargs.items() if k not in FRONTEND_OPTIONS})
        server_side = self.generation.server_side_defaults()
        if server_side:
            kwargs["override_generation_config"] = {
                **server_side, **(self.engine_kwargs.get("override_generation_config") or {})}
        return kwargs

    def vllm_frontend_kwargs(self) -> dict[str, Any]:
        """vLLM frontend options (FrontendArgs fields) from engine_kwargs, plus `chat_template`
        compiled from generation.prompt_format when one is set."""
        kwargs = {k: v for k, v in self.engine_kwargs.items() if k in FRONTEND_OPTIONS}
        if self.generation.prompt_format is not None:
            kwargs["chat_template"] = chat_template(self.generation.prompt_format)
        return kwargs

    def ignored_settings(self) -> dict[str, list[str]]:
        """Settings accepted for RayLLM compatibility that have no effect here, by section
        (dotted path) -> the key names in it."""
        ignored: dict[str, list[str]] = {}
        init = sorted(set(self.model_init_kwargs) - set(MODEL_INIT_KWARGS_TO_ENGINE))
        if init:
            ignored["engine_config.model_init_kwargs"] = init
        if self.scheduler is not None and self.scheduler.ignored():
            ignored["engine_config.scheduler"] = self.scheduler.ignored()
        if self.generation.ignored_generate_kwargs():
            ignored["engine_config.generation.generate_kwargs"] = self.generation.ignored_generate_kwargs()
        return ignored


class ScalingConfig(StrictModel):
    """The worker group each replica reserves: one placement-group bundle per worker."""

    num_workers: int = Field(1, ge=1)
    num_gpus_per_worker: float = Field(1.0, ge=0)
    num_cpus_per_worker: float = Field(1.0, ge=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"
    accelerator_type: str | None = Field(
        None, description="Sugar for the Ray resource 'accelerator_type:<X>', e.g. A10G, L4, H100."
    )
    pg_timeout_s: float = Field(600.0, gt=0, description="How long to wait for the worker group.")

    def worker_bundle(self) -> dict[str, float]:
        bundle: dict[str, float] = {"CPU": self.num_cpus_per_worker}
        if self.num_gpus_per_worker:
            bundle["GPU"] = self.num_gpus_per_worker
        if self.accelerator_type:
            bundle[f"accelerator_type:{self.accelerator_type}"] = 0.001
        bundle.update(self.resources_per_worker)
        return {k: v for k, v in bundle.items() if v}


class ModelConfig(StrictModel):
    enabled: bool = True
    deployment_config: DeploymentConfig = Field(default_factory=DeploymentConfig)
    engine_config: EngineConfig
    scaling_config: ScalingConfig = Field(default_factory=ScalingConfig)
    lora_config: LoraConfig | None = Field(
        None, description="LoRA adapters served on this base model, loaded on demand (see lora_config.py).")

    @model_validator(mode="after")
    def _lora_fits(self) -> ModelConfig:
        if self.lora_config is None:
            return self
        managed = sorted(set(self.engine_config.engine_kwargs) & set(self.lora_config.engine_kwargs()))
        if managed:
            raise ValueError(f"engine_config.engine_kwargs sets {', '.join(managed)}: with lora_config, set "
                             "max_loras and max_lora_rank there instead (it enables LoRA itself)")
        if "embeddings" in self.capabilities() and "chat" not in self.capabilities():
            raise ValueError("lora_config: adapters are served on generative models; this one is a pooling model")
        return self

    def adapter_names(self) -> dict[str, str]:
        """Every name a client may send for a named adapter of this model -> its adapter id
        (``<base>:<adapter>``); adapters under the dynamic path are found when listed."""
        if self.lora_config is None:
            return {}
        names = {adapter_id(self.model_id, name): adapter_id(self.model_id, name) for name in self.lora_config.named()}
        names.update({alias: adapter_id(self.model_id, name) for alias, name in self.lora_config.aliases().items()})
        return names

    @model_validator(mode="after")
    def _parallelism_matches_workers(self) -> ModelConfig:
        kwargs = self.engine_config.engine_kwargs
        tp, pp = (kwargs.get(name, 1) for name in ("tensor_parallel_size", "pipeline_parallel_size"))
        for name, value in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine_config.engine_kwargs.{name} must be a positive integer, got {value!r}")
        if self.deployment_config.idle_sleep is not None and not self.scaling_config.num_gpus_per_worker:
            raise ValueError(
                "deployment_config.idle_sleep needs GPUs: vLLM's sleep mode gives GPU memory back, and "
                "vLLM on CPUs has no sleep mode (scaling_config.num_gpus_per_worker is 0). Remove "
                "idle_sleep, or give the workers GPUs.")
        if tp * pp != self.scaling_config.num_workers:
            raise ValueError(
                f"engine_config.engine_kwargs.tensor_parallel_size ({tp}) x pipeline_parallel_size "
                f"({pp}) must equal scaling_config.num_workers ({self.scaling_config.num_workers})"
            )
        return self

    @property
    def model_id(self) -> str:
        return self.engine_config.model_id

    def capabilities(self) -> list[str]:
        """What the model serves: engine_config.capabilities when set; else, for a pooling model
        (engine_kwargs runner "pooling", or convert embed/classify) embeddings, score and
        tokenize; for a generative one chat, completions, responses, messages and tokenize, plus
        tools with enable_auto_tool_choice or a tool_call_parser, plus reasoning with a
        reasoning_parser."""
        engine = self.engine_config
        if engine.capabilities is not None:
            return list(engine.capabilities)
        kwargs = engine.engine_kwargs
        if kwargs.get("runner") == "pooling" or kwargs.get("convert") in POOLING_CONVERTS:
            return list(POOLING_CAPABILITIES)
        result = list(GENERATIVE_CAPABILITIES)
        if kwargs.get("enable_auto_tool_choice") or kwargs.get("tool_call_parser"):
            result.append("tools")
        if kwargs.get("reasoning_parser"):
            result.append("reasoning")
        return result


@functools.lru_cache(maxsize=1)
def vllm_engine_arg_names() -> frozenset[str] | None:
    """Names vLLM's AsyncEngineArgs accepts, or None when vLLM is not installed here.

    Read from vLLM's source, not by importing it: ``import vllm.engine.arg_utils`` pulls in
    torch and vLLM's config (4 s on a warm CPU host, ~20 s on a cold GPU host), and ``rayllm
    run`` checks every model file before Ray even starts. The import is the fallback when
    the source does not parse into fields (a vLLM that moved its arguments).
    """
    names = _engine_arg_names_from_source()
    if names:
        return names
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        logger.debug("vLLM not importable; engine_kwargs are checked when the engine starts")
        return None
    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def _engine_arg_names_from_source() -> frozenset[str] | None:
    """The annotated fields of the dataclasses EngineArgs and AsyncEngineArgs in vLLM's
    ``engine/arg_utils.py``, found without importing vLLM."""
    import ast
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ("EngineArgs", "AsyncEngineArgs"):
            for item in node.body:
                if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                        and "ClassVar" not in ast.unparse(item.annotation)):
                    names.add(item.target.id)
    return frozenset(names) if {"model", "dtype", "tensor_parallel_size"} <= names else None
