"""The model YAML schema (one file per model) and its loader.

Pydantic models here are the single source of truth for what a model file may say.
Field names follow RayLLM's so its YAMLs load unchanged; RayLLM's older spellings
(``max_concurrent_queries``, ``target_num_ongoing_requests_per_replica``) are accepted
and translated. Unknown fields are errors, and every error names the file, the field
path and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
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
    def _needs_instruction(cls, value: str) -> str:
        if "{instruction}" not in value:
            raise ValueError("must contain the placeholder '{instruction}'")
        try:
            value.format(instruction="", system="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"has a placeholder other than {{instruction}}/{{system}} ({error}); "
                "write literal braces as '{{' and '}}'") from None
        return value

    @model_validator(mode="after")
    def _system_placeholder(self) -> PromptFormat:
        if self.system_in_user and "{system}" not in self.user:
            raise ValueError("user must contain '{system}' when system_in_user is true")
        if not self.system_in_user and "{system}" in self.user:
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
        from rayllm_app.sampling import SAMPLING_DEFAULT_KEYS

        unknown = sorted(set(value) - SAMPLING_DEFAULT_KEYS)
        if unknown:
            raise ValueError(
                f"unknown generate_kwargs {unknown}; allowed: {sorted(SAMPLING_DEFAULT_KEYS)}"
            )
        return value


class EngineConfig(StrictModel):
    """What to load and how the engine runs it."""

    model_id: str = Field(min_length=1, description="The name clients send as `model`.")
    hf_model_id: str | None = Field(
        None,
        description="Hugging Face id, local folder, or 'builtin:<name>'; defaults to model_id.",
    )
    type: Literal["VLLMEngine"] = "VLLMEngine"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
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

    @field_validator("engine_kwargs")
    @classmethod
    def _check_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, field in MANAGED_ENGINE_ARGS.items():
            if key in value:
                raise ValueError(f"'{key}' is set by {field}, not engine_kwargs")
        valid = vllm_engine_arg_names()
        if valid is not None:
            unknown = sorted(set(value) - valid)
            if unknown:
                raise ValueError(
                    f"unknown vLLM engine argument(s) {unknown}; valid ones: {', '.join(sorted(valid))}"
                )
        return value

    @model_validator(mode="after")
    def _context_length_agrees(self) -> EngineConfig:
        explicit = self.engine_kwargs.get("max_model_len")
        if explicit is not None and self.max_total_tokens is not None and explicit != self.max_total_tokens:
            raise ValueError(
                f"max_total_tokens ({self.max_total_tokens}) and engine_kwargs.max_model_len "
                f"({explicit}) disagree; set only max_total_tokens"
            )
        return self

    @property
    def model_source(self) -> str:
        return self.hf_model_id or self.model_id

    @property
    def context_length(self) -> int | None:
        return self.max_total_tokens or self.engine_kwargs.get("max_model_len")


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
        return ModelConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


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
