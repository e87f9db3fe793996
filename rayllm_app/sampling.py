"""Merge a request's sampling parameters with the model's configured defaults.

The result is a plain dict of vLLM ``SamplingParams`` keyword arguments (plus a
``structured_outputs`` dict), so this module stays free of engine imports and is
unit-testable on its own.
"""

from __future__ import annotations

import json
from typing import Any

from rayllm_app.config import GenerationConfig
from rayllm_app.errors import ContextLengthExceededError, InvalidRequestError
from rayllm_app.protocol import ChatCompletionRequest, CompletionRequest

# Request fields that map one-to-one onto SamplingParams.
PASSTHROUGH_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "min_tokens", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "include_stop_str_in_output",
)
# What a model's generate_kwargs may set: the passthrough keys, the output budget, stop
# sequences, and RayLLM's Hugging Face spellings (max_new_tokens, do_sample).
SAMPLING_DEFAULT_KEYS = frozenset(PASSTHROUGH_KEYS) | {"max_tokens", "stop", "max_new_tokens", "do_sample"}


def normalized_defaults(generation: GenerationConfig) -> dict[str, Any]:
    defaults = dict(generation.generate_kwargs)
    if "max_new_tokens" in defaults:
        defaults.setdefault("max_tokens", defaults.pop("max_new_tokens"))
        defaults.pop("max_new_tokens", None)
    if defaults.pop("do_sample", True) is False:
        defaults["temperature"] = 0.0
    if isinstance(defaults.get("stop"), str):
        defaults["stop"] = [defaults["stop"]]
    return defaults


def merged_stop(request_stop: list[str] | None, defaults: dict[str, Any],
                stopping_sequences: list[str]) -> list[str]:
    """Request stops (else the default ones), plus the model's stopping_sequences."""
    merged: list[str] = []
    for item in (request_stop if request_stop is not None else defaults.get("stop") or []) + stopping_sequences:
        if item not in merged:
            merged.append(item)
    return merged


def output_budget(requested: int | None, default: int | None, prompt_tokens: int,
                  context_length: int, prompt_param: str = "messages") -> int:
    """The max_tokens to give the engine, or a clear 400 when the request cannot fit."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_length} tokens, but the prompt has "
            f"{prompt_tokens} tokens. Shorten the prompt.",
            param=prompt_param,
        )
    if requested is not None:
        if requested > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context_length} tokens. However, you "
                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                f"{requested} for the completion). Reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        return requested
    return min(default, room) if default is not None else room


def structured_outputs(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any] | None:
    """response_format, or vLLM's legacy guided_* parameters, as structured-output options."""
    if request.guided_json is not None:
        schema = request.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                raise InvalidRequestError("guided_json must be a JSON schema object.", param="guided_json") from None
        return {"json": schema}
    if request.guided_regex is not None:
        return {"regex": request.guided_regex}
    if request.guided_choice is not None:
        return {"choice": request.guided_choice}
    if request.guided_grammar is not None:
        return {"grammar": request.guided_grammar}
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"json_object": True}
    assert response_format.json_schema is not None
    return {"json": response_format.json_schema.schema_}


def build_sampling_kwargs(
    request: ChatCompletionRequest | CompletionRequest,
    generation: GenerationConfig,
    *,
    prompt_tokens: int,
    context_length: int,
) -> dict[str, Any]:
    defaults = normalized_defaults(generation)
    kwargs: dict[str, Any] = {k: defaults[k] for k in PASSTHROUGH_KEYS if k in defaults}
    for key in PASSTHROUGH_KEYS:
        value = getattr(request, key)
        if value is not None:
            kwargs[key] = value
    kwargs["n"] = request.n
    kwargs["stop"] = merged_stop(request.stop, defaults, generation.stopping_sequences)
    # A completion defaults to 16 tokens (OpenAI); a chat answer may fill the context.
    default_budget = defaults.get("max_tokens")
    if default_budget is None and isinstance(request, CompletionRequest):
        default_budget = 16
    kwargs["max_tokens"] = output_budget(
        request.output_limit(), default_budget, prompt_tokens, context_length,
        prompt_param="prompt" if isinstance(request, CompletionRequest) else "messages")
    if request.logit_bias:
        kwargs["logit_bias"] = {int(token): bias for token, bias in request.logit_bias.items()}
    if isinstance(request, ChatCompletionRequest):
        if request.logprobs:
            kwargs["logprobs"] = request.top_logprobs or 0
    elif request.logprobs is not None:
        kwargs["logprobs"] = request.logprobs
    structured = structured_outputs(request)
    if structured is not None:
        kwargs["structured_outputs"] = structured
    limits = generation
    if request.n > limits.max_n:
        raise InvalidRequestError(f"n must be at most {limits.max_n} for this model.", param="n")
    if (kwargs.get("logprobs") or 0) > limits.max_logprobs:
        raise InvalidRequestError(f"At most {limits.max_logprobs} logprobs per token are allowed for this model.",
                                  param="top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs")
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise InvalidRequestError("suffix is not supported by this server.", param="suffix",
                                      code="unsupported_parameter")
        if request.best_of is not None and request.best_of != request.n:
            raise InvalidRequestError("best_of other than n is not supported.", param="best_of",
                                      code="unsupported_parameter")
    return kwargs
