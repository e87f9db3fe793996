"""Unit tests for request validation (rayllm_app.protocol) and sampling-parameter merging
(rayllm_app.sampling)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rayllm_app.config import GenerationConfig
from rayllm_app.errors import ContextLengthExceededError, InvalidRequestError
from rayllm_app.protocol import ChatCompletionRequest, CompletionRequest
from rayllm_app.sampling import (
    PASSTHROUGH_KEYS,
    build_sampling_kwargs,
    merged_stop,
    normalized_defaults,
    output_budget,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def gen(generate_kwargs: dict[str, Any] | None = None, stopping_sequences: list[str] | None = None) -> GenerationConfig:
    return GenerationConfig(generate_kwargs=generate_kwargs or {}, stopping_sequences=stopping_sequences or [])


def build(request, generation: GenerationConfig | None = None, prompt_tokens: int = 10,
          context_length: int = 100) -> dict[str, Any]:
    return build_sampling_kwargs(request, generation or gen(), prompt_tokens=prompt_tokens,
                                 context_length=context_length)


# ---------------------------------------------------------------- protocol validation


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 2.5},
        {"temperature": -0.1},
        {"n": 0},
        {"top_p": 0},
        {"top_logprobs": 2},
        {"top_logprobs": 2, "logprobs": False},
        {"top_logprobs": 21, "logprobs": True},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x", "colour": "red"}]},
        {"frobnicate": True},
        {"stop": ""},
        {"stop": ["ok", ""]},
        {"stop": [str(i) for i in range(17)]},
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"5": 101}},
        {"max_tokens": 0},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "yaml"}},
        {"model": ""},
    ],
    ids=lambda f: ",".join(f),
)
def test_invalid_chat_requests_raise_validation_error(fields: dict[str, Any]):
    with pytest.raises(ValidationError):
        chat(**fields)


def test_unknown_field_is_extra_forbidden():
    with pytest.raises(ValidationError) as info:
        chat(functions=[])
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert info.value.errors()[0]["loc"] == ("functions",)


def test_valid_edges_accepted():
    request = chat(temperature=2, n=128, logprobs=True, top_logprobs=20, stop="END",
                   messages=[{"role": "developer", "content": "d"}, {"role": "user", "content": None}])
    assert request.stop == ["END"]  # a single stop string becomes a list
    assert chat(top_logprobs=0).top_logprobs == 0


@pytest.mark.parametrize(
    "fields",
    [{"prompt": []}, {"prompt": [[]]}, {"prompt": [[1], []]}, {"prompt": ["a", 1]}, {"logprobs": 21},
     {"echo": True, "unknown": 1}, {"best_of": 0}],
    ids=lambda f: repr(f),
)
def test_invalid_completion_requests_raise_validation_error(fields: dict[str, Any]):
    with pytest.raises(ValidationError):
        completion(**fields)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
    ids=["str", "list[str]", "list[int]", "list[list[int]]"],
)
def test_completion_prompts_as_batch(prompt, expected):
    assert completion(prompt=prompt).prompts() == expected


def test_chat_output_limit_prefers_max_completion_tokens():
    assert chat(max_tokens=5, max_completion_tokens=7).output_limit() == 7
    assert chat(max_tokens=5).output_limit() == 5
    assert chat().output_limit() is None


# ---------------------------------------------------------------- defaults and overrides


def test_request_overrides_generate_kwargs():
    kwargs = build(chat(temperature=0.2), gen({"temperature": 0.7, "top_p": 0.9}))
    assert kwargs["temperature"] == 0.2
    assert kwargs["top_p"] == 0.9


def test_none_means_model_default_but_zero_is_a_value():
    generation = gen({"temperature": 0.7, "presence_penalty": 0.5})
    kwargs = build(chat(), generation)
    assert kwargs["temperature"] == 0.7 and kwargs["presence_penalty"] == 0.5
    kwargs = build(chat(temperature=0.0, presence_penalty=0.0), generation)
    assert kwargs["temperature"] == 0.0 and kwargs["presence_penalty"] == 0.0


def test_unset_parameters_are_left_to_the_engine():
    kwargs = build(chat())
    assert not set(PASSTHROUGH_KEYS) & set(kwargs)
    assert "logprobs" not in kwargs and "logit_bias" not in kwargs and "structured_outputs" not in kwargs
    assert kwargs["n"] == 1


def test_every_passthrough_field_reaches_the_engine():
    values = {"temperature": 0.3, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "presence_penalty": 0.1,
              "frequency_penalty": 0.2, "repetition_penalty": 1.1, "seed": 42, "min_tokens": 2,
              "ignore_eos": True, "stop_token_ids": [5], "skip_special_tokens": False,
              "include_stop_str_in_output": True}
    assert set(values) == set(PASSTHROUGH_KEYS)
    kwargs = build(chat(n=3, **values))
    assert {k: kwargs[k] for k in values} == values
    assert kwargs["n"] == 3


def test_rayllm_spellings_max_new_tokens_and_do_sample():
    defaults = normalized_defaults(gen({"max_new_tokens": 12, "do_sample": False, "temperature": 0.9}))
    assert defaults == {"max_tokens": 12, "temperature": 0.0}
    kwargs = build(chat(), gen({"max_new_tokens": 12, "do_sample": False}))
    assert kwargs["max_tokens"] == 12 and kwargs["temperature"] == 0.0
    # the request still wins over do_sample: false
    assert build(chat(temperature=1.0), gen({"do_sample": False}))["temperature"] == 1.0
    # do_sample: true changes nothing
    assert "temperature" not in build(chat(), gen({"do_sample": True}))


def test_max_tokens_wins_over_max_new_tokens():
    assert normalized_defaults(gen({"max_tokens": 5, "max_new_tokens": 50}))["max_tokens"] == 5


# ---------------------------------------------------------------- stop sequences


def test_stop_defaults_plus_stopping_sequences():
    generation = gen({"stop": ["A"]}, stopping_sequences=["S", "A"])
    assert build(chat(), generation)["stop"] == ["A", "S"]


def test_request_stop_replaces_default_stop_but_keeps_stopping_sequences():
    generation = gen({"stop": ["A"]}, stopping_sequences=["S"])
    assert build(chat(stop=["B", "S", "B"]), generation)["stop"] == ["B", "S"]
    assert build(chat(stop="X"), generation)["stop"] == ["X", "S"]
    assert build(chat(stop=[]), generation)["stop"] == ["S"]


def test_default_stop_given_as_a_string():
    assert build(chat(), gen({"stop": "END"}, ["</s>"]))["stop"] == ["END", "</s>"]


def test_merged_stop_deduplicates_in_order():
    assert merged_stop(["x", "y", "x"], {"stop": ["ignored"]}, ["y", "z"]) == ["x", "y", "z"]
    assert merged_stop(None, {}, []) == []


# ---------------------------------------------------------------- output budget


def test_chat_default_budget_fills_the_context():
    assert build(chat(), prompt_tokens=30, context_length=100)["max_tokens"] == 70


def test_completion_default_budget_is_16():
    assert build(completion(), prompt_tokens=30, context_length=100)["max_tokens"] == 16
    assert build(completion(), prompt_tokens=95, context_length=100)["max_tokens"] == 5


def test_prompt_too_long_is_context_length_exceeded():
    with pytest.raises(ContextLengthExceededError) as info:
        build(chat(), prompt_tokens=100, context_length=100)
    error = info.value
    assert error.status_code == 400
    assert error.code == "context_length_exceeded"
    assert "100 tokens" in error.message
    assert error.to_dict()["error"]["code"] == "context_length_exceeded"


def test_completion_prompt_too_long_names_prompt_param():
    with pytest.raises(ContextLengthExceededError) as info:
        build(completion(), prompt_tokens=100, context_length=100)
    assert info.value.param == "prompt"


def test_requested_max_tokens_beyond_room_is_a_400_on_max_tokens():
    assert build(chat(max_tokens=90), prompt_tokens=10, context_length=100)["max_tokens"] == 90
    with pytest.raises(ContextLengthExceededError) as info:
        build(chat(max_tokens=91), prompt_tokens=10, context_length=100)
    assert info.value.status_code == 400
    assert info.value.param == "max_tokens"
    assert "101 tokens" in info.value.message
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        build(completion(max_tokens=500), prompt_tokens=10, context_length=100)


def test_max_completion_tokens_is_checked_too():
    with pytest.raises(ContextLengthExceededError):
        build(chat(max_completion_tokens=95), prompt_tokens=10, context_length=100)


def test_config_default_clamps_instead_of_erroring():
    generation = gen({"max_tokens": 500})
    assert build(chat(), generation, prompt_tokens=10, context_length=100)["max_tokens"] == 90
    assert build(completion(), generation, prompt_tokens=10, context_length=100)["max_tokens"] == 90
    assert build(chat(), gen({"max_tokens": 20}), prompt_tokens=10, context_length=100)["max_tokens"] == 20


def test_output_budget_direct():
    assert output_budget(None, None, 1, 10) == 9
    assert output_budget(3, 100, 1, 10) == 3
    assert output_budget(None, 4, 1, 10) == 4


# ---------------------------------------------------------------- logprobs, formats, bias


def test_chat_logprobs_mapping():
    assert build(chat(logprobs=True, top_logprobs=3))["logprobs"] == 3
    assert build(chat(logprobs=True))["logprobs"] == 0
    assert "logprobs" not in build(chat(logprobs=False))


def test_completion_logprobs_mapping():
    assert build(completion(logprobs=2))["logprobs"] == 2
    assert build(completion(logprobs=0))["logprobs"] == 0
    assert "logprobs" not in build(completion())


def test_response_format_json_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    kwargs = build(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))
    assert kwargs["structured_outputs"] == {"json": schema}


def test_response_format_json_object_and_text():
    assert build(completion(response_format={"type": "json_object"}))["structured_outputs"] == {"json_object": True}
    assert "structured_outputs" not in build(chat(response_format={"type": "text"}))


def test_logit_bias_keys_become_ints():
    kwargs = build(chat(logit_bias={"5": 1.5, "42": -100}))
    assert kwargs["logit_bias"] == {5: 1.5, 42: -100}
    assert all(isinstance(key, int) for key in kwargs["logit_bias"])


def test_suffix_rejected():
    with pytest.raises(InvalidRequestError) as info:
        build(completion(suffix="tail"))
    assert info.value.status_code == 400
    assert info.value.param == "suffix"
    assert info.value.code == "unsupported_parameter"


def test_best_of_other_than_n_rejected():
    with pytest.raises(InvalidRequestError) as info:
        build(completion(best_of=3, n=2))
    assert info.value.param == "best_of"
    assert info.value.code == "unsupported_parameter"
    assert build(completion(best_of=2, n=2))["n"] == 2
