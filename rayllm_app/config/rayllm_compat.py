"""RayLLM compatibility: the model-file sections and spellings that predate vLLM.

``engine_config.model_init_kwargs`` (transformers ``from_pretrained`` kwargs) and
``engine_config.scheduler`` (TGI's continuous-batching policy) map to the vLLM engine arguments
they correspond to; the Hugging Face spellings in ``generation.generate_kwargs``
(``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``stopping_sequences``) are normalized to
vLLM's names. Whatever has no vLLM equivalent is accepted and listed, so the loader can log one
line per section (``EngineConfig.ignored_settings``). RayLLM's prompt formats are in
:mod:`rayllm_app.config.prompt_format`; the schema that uses all of this is
:mod:`rayllm_app.config.schema`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

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



def vllm_dtype(value: Any) -> Any:
    """A transformers torch_dtype ("torch.bfloat16", "bfloat16", "auto") as vLLM's dtype."""
    return value.removeprefix("torch.") if isinstance(value, str) else value


def model_init_engine_kwargs(model_init_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The vLLM engine arguments RayLLM's engine_config.model_init_kwargs map to."""
    kwargs: dict[str, Any] = {}
    for key, target in MODEL_INIT_KWARGS_TO_ENGINE.items():
        if key in model_init_kwargs:
            value = model_init_kwargs[key]
            kwargs[target] = vllm_dtype(value) if target == "dtype" else value
    return kwargs


def normalize_generate_kwargs(generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """generate_kwargs normalized to vLLM's names: max_new_tokens -> max_tokens,
    min_new_tokens -> min_tokens (an explicit vLLM spelling wins), do_sample: false ->
    temperature 0, stop (and RayLLM's generate_kwargs.stopping_sequences) -> a list of
    strings; keys without a vLLM meaning are dropped."""
    defaults = {k: v for k, v in generate_kwargs.items() if k not in IGNORED_GENERATE_KWARGS}
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
    if stop or "stop" in generate_kwargs:
        defaults["stop"] = stop
    return defaults


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
