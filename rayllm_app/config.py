"""The model YAML schema (one file per model) and its loader.

Pydantic models here are the single source of truth for what a model file may say.
Field names follow RayLLM's so its YAMLs load unchanged; RayLLM's older spellings
(``max_concurrent_queries``, ``target_num_ongoing_requests_per_replica``) are accepted
and translated. Unknown fields are errors, and every error names the file, the field
path and what was expected.

RayLLM's older, pre-vLLM sections load too: ``engine_config.model_init_kwargs`` and
``engine_config.scheduler`` are mapped to the vLLM engine arguments they correspond to, the
Hugging Face spellings in ``generate_kwargs`` are normalized, and whatever has no vLLM
equivalent is ignored with one log line per section. A model replica builds vLLM's engine
from ``EngineConfig.vllm_engine_kwargs()`` and vLLM's OpenAI app from
``EngineConfig.vllm_frontend_kwargs()``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rayllm_app.s3_config import S3MirrorConfig

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

# ---- generate_kwargs: sampling defaults
# Keys that are vLLM SamplingParams fields under the same name.
SAMPLING_PARAM_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "min_tokens", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "include_stop_str_in_output",
)
# RayLLM's Hugging Face spellings and the vLLM names they normalize to.
HF_GENERATE_SPELLINGS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
# What a model's generate_kwargs may set: the SamplingParams keys, the output budget, stop
# sequences, RayLLM's Hugging Face spellings (max_new_tokens, min_new_tokens, do_sample) and its
# `stopping_sequences` (a default `stop`).
SAMPLING_DEFAULT_KEYS = (frozenset(SAMPLING_PARAM_KEYS) | {"max_tokens", "stop", "do_sample", "stopping_sequences"}
                         | frozenset(HF_GENERATE_SPELLINGS))
# Hugging Face generate() keys that mean nothing to vLLM: accepted, dropped, logged once.
IGNORED_GENERATE_KWARGS = frozenset({
    "return_token_type_ids", "return_dict_in_generate", "output_scores", "output_attentions",
    "output_hidden_states", "use_cache", "pad_token_id", "return_full_text",
})
# Normalized defaults that vLLM applies server-side through override_generation_config (its
# generation-config keys, Hugging Face spelled: max_tokens travels as max_new_tokens).
SERVER_SIDE_DEFAULTS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "max_tokens": "max_new_tokens",
}

# ---- RayLLM (Aviary) engine_config sections that predate vLLM
# engine_config.model_init_kwargs (transformers from_pretrained kwargs) -> vLLM engine argument.
MODEL_INIT_KWARGS_TO_ENGINE = {
    "trust_remote_code": "trust_remote_code",
    "torch_dtype": "dtype",
    "dtype": "dtype",
    "revision": "revision",
    "code_revision": "code_revision",
    "cache_dir": "download_dir",
}
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

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
        300.0, gt=0, description="How long a request waits for a replica of a model that has none running.")

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


class PromptFormat(StrictModel):
    """RayLLM's prompt format: string templates instead of the tokenizer's chat template."""

    system: str = "{instruction}"
    assistant: str = "{instruction}"
    trailing_assistant: str = ""
    user: str = "{instruction}"
    default_system_message: str = ""
    system_in_user: bool = False
    add_system_tags_even_if_message_is_empty: bool = False
    strip_whitespace: bool = True

    @field_validator("system", "assistant", "user")
    @classmethod
    def _needs_instruction(cls, value: str, info: ValidationInfo) -> str:
        allowed = ("instruction", "system") if info.field_name == "user" else ("instruction",)
        shown = "/".join(f"{{{name}}}" for name in allowed)
        try:
            fields = [(name, spec, conversion)
                      for _, name, spec, conversion in string.Formatter().parse(value) if name is not None]
        except ValueError as error:
            raise ValueError(f"is not a valid template ({error}); write literal braces as '{{{{' and '}}}}'") from None
        for name, spec, conversion in fields:
            if name not in allowed or spec or conversion:
                raise ValueError(
                    f"has a placeholder other than {shown} ({{{name}{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}}}); write literal braces as '{{{{' and '}}}}'")
        if "instruction" not in {name for name, _, _ in fields}:
            raise ValueError("must contain the placeholder '{instruction}'")
        return value

    @model_validator(mode="after")
    def _system_placeholder(self) -> PromptFormat:
        has_system = "system" in {name for _, name, _, _ in string.Formatter().parse(self.user)}
        if self.system_in_user and not has_system:
            raise ValueError("user must contain '{system}' when system_in_user is true")
        if not self.system_in_user and has_system:
            raise ValueError("user may contain '{system}' only when system_in_user is true")
        return self


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
        """generate_kwargs normalized to vLLM's names: max_new_tokens -> max_tokens,
        min_new_tokens -> min_tokens (an explicit vLLM spelling wins), do_sample: false ->
        temperature 0, stop (and RayLLM's generate_kwargs.stopping_sequences) -> a list of
        strings; keys without a vLLM meaning are dropped."""
        defaults = {k: v for k, v in self.generate_kwargs.items() if k not in IGNORED_GENERATE_KWARGS}
        for hf_name, name in HF_GENERATE_SPELLINGS.items():
            if hf_name in defaults:
                value = defaults.pop(hf_name)
                defaults.setdefault(name, value)
        if defaults.pop("do_sample", True) is False:
            defaults["temperature"] = 0.0
        stop: list[str] = []
        for key in ("stop", "stopping_sequences"):
            value = defaults.pop(key, None)
            for item in [value] if isinstance(value, str) else value or []:
                if item not in stop:
                    stop.append(item)
        if stop or "stop" in self.generate_kwargs:
            defaults["stop"] = stop
        return defaults

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


class SchedulerPolicy(BaseModel):
    """RayLLM's TGI-era continuous-batching policy. What has a vLLM equivalent is mapped
    (see EngineConfig.vllm_engine_kwargs and max_total_tokens); the rest is accepted and logged."""

    model_config = ConfigDict(extra="allow")

    max_total_tokens: int | None = Field(None, ge=16)
    max_input_length: int | None = Field(None, ge=1)
    max_batch_prefill_tokens: int | None = Field(None, ge=1)
    max_batch_total_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _input_fits(self) -> SchedulerPolicy:
        if (self.max_input_length is not None and self.max_total_tokens is not None
                and self.max_input_length > self.max_total_tokens):
            raise ValueError(f"max_input_length ({self.max_input_length}) must not exceed "
                             f"max_total_tokens ({self.max_total_tokens})")
        return self


class SchedulerConfig(BaseModel):
    """RayLLM's engine_config.scheduler section (TGI era)."""

    model_config = ConfigDict(extra="allow")

    policy: SchedulerPolicy = Field(default_factory=SchedulerPolicy)

    def engine_kwargs(self) -> dict[str, Any]:
        """The vLLM engine arguments this section maps to."""
        batched = self.policy.max_batch_total_tokens or self.policy.max_batch_prefill_tokens
        return {"max_num_batched_tokens": batched} if batched else {}

    def ignored(self) -> list[str]:
        """Dotted names (below engine_config.scheduler) with no vLLM equivalent."""
        names = [str(k) for k in self.model_extra or {}]
        names += [f"policy.{k}" for k in self.policy.model_extra or {}]
        if self.policy.max_input_length is not None:
            names.append("policy.max_input_length")
        if self.policy.max_batch_total_tokens and self.policy.max_batch_prefill_tokens:
            names.append("policy.max_batch_prefill_tokens")
        return sorted(names)


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
            if key in value and _vllm_dtype(value[key]) not in VLLM_DTYPES:
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
        kwargs: dict[str, Any] = {}
        for key, target in MODEL_INIT_KWARGS_TO_ENGINE.items():
            if key in self.model_init_kwargs:
                value = self.model_init_kwargs[key]
                kwargs[target] = _vllm_dtype(value) if target == "dtype" else value
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
            from rayllm_app.prompt_format import chat_template

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


def _vllm_dtype(value: Any) -> Any:
    """A transformers torch_dtype ("torch.bfloat16", "bfloat16", "auto") as vLLM's dtype."""
    return value.removeprefix("torch.") if isinstance(value, str) else value


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

    @model_validator(mode="after")
    def _parallelism_matches_workers(self) -> ModelConfig:
        kwargs = self.engine_config.engine_kwargs
        tp, pp = (kwargs.get(name, 1) for name in ("tensor_parallel_size", "pipeline_parallel_size"))
        for name, value in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine_config.engine_kwargs.{name} must be a positive integer, got {value!r}")
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
    """Names vLLM's AsyncEngineArgs accepts, or None when vLLM is not installed here."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        logger.debug("vLLM not importable; engine_kwargs are checked when the engine starts")
        return None
    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def _format_location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid model config ({error.error_count()} error(s))"]
    for item in error.errors(include_url=False):
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (remove it or check its spelling)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  {_format_location(item['loc'])}: {message}")
    return "\n".join(lines)


def parse_model_config(data: Any, source: str = "<inline>") -> ModelConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with engine_config, got {type(data).__name__}")
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None
    log_ignored_settings(config, source)
    return config


def log_ignored_settings(config: ModelConfig, source: str) -> None:
    """One log line per RayLLM section whose settings have no effect here."""
    engine = config.engine_config
    if engine.type != "VLLMEngine":
        logger.info("%s: engine_config.type %s: served by vLLM", source, engine.type)
    for section, names in engine.ignored_settings().items():
        logger.warning("%s: %s: ignoring %s (no vLLM equivalent)", source, section, ", ".join(names))


def read_model_file(path: str | Path) -> Any:
    """The YAML mapping in a model file, or a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read model config ({error.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    return parse_model_config(read_model_file(path), str(path))


def expand_model_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expand to their *.yaml / *.yml files in name order."""
    result: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            result.extend(sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"}))
        else:
            result.append(path)
    return result


@dataclass(frozen=True)
class ModelEntry:
    """One enabled model: where it came from, its mapping as written, and the validated config."""

    source: str
    data: dict[str, Any]
    config: ModelConfig


def load_model_entries(sources: list[str | Path | dict[str, Any]]) -> list[ModelEntry]:
    """Load files, folders and inline mappings; skip disabled models; reject duplicate ids.

    Every problem in every file is collected, so one run reports them all.
    """
    entries: list[ModelEntry] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for source in sources:
        items = [("<inline>", source)] if isinstance(source, dict) else [
            (str(p), p) for p in expand_model_paths([source])]
        for name, item in items:
            try:
                data = item if isinstance(item, dict) else read_model_file(item)
                config = parse_model_config(data, name)
            except ConfigError as error:
                errors.append(str(error))
                continue
            if not config.enabled:
                logger.info("Skipping %s: enabled is false", name)
                continue
            if config.model_id in seen:
                errors.append(f"{name}: engine_config.model_id '{config.model_id}' is also used by "
                              f"{seen[config.model_id]}")
                continue
            seen[config.model_id] = name
            entries.append(ModelEntry(name, data, config))
    if errors:
        raise ConfigError("\n".join(errors))
    return entries


def load_model_configs(sources: list[str | Path | dict[str, Any]]) -> list[ModelConfig]:
    return [entry.config for entry in load_model_entries(sources)]
