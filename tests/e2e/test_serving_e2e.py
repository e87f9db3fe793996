"""End to end: real Ray Serve + vLLM-CPU engines, over HTTP, with the openai SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL, FORCED_TOKEN, TINY_A, TINY_B

pytestmark = pytest.mark.e2e


def test_list_models_from_config(served_app):
    client = served_app.client()
    models = {m.id: m for m in client.models.list().data}
    assert {TINY_A, TINY_B, DEFAULT_MODEL} <= set(models)
    card = client.models.retrieve(TINY_A)
    assert card.id == TINY_A and card.object == "model"
    raw = httpx.get(f"{served_app.base_url}/models/{DEFAULT_MODEL}", headers=served_app.headers).json()
    assert raw["max_model_len"] == 2048
    assert "SmolLM2" in raw["metadata"]["description"]


def test_completion_honours_max_tokens_and_usage(served_app):
    result = served_app.client().completions.create(
        model=TINY_A, prompt="hello world", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def test_chat_completion_shape(served_app):
    result = served_app.client().chat.completions.create(
        model=TINY_A, messages=[{"role": "user", "content": "hello"}], max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.choices[0].message.role == "assistant"
    assert isinstance(result.choices[0].message.content, str)
    assert result.usage.completion_tokens == 5


def test_streamed_chat_chunks_and_usage(served_app):
    stream = served_app.client().chat.completions.create(
        model=TINY_A, messages=[{"role": "user", "content": "count"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content_chunks, "no content streamed"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done(served_app):
    with httpx.stream("POST", headers=served_app.headers, url=f"{served_app.base_url}/completions", json={
        "model": TINY_A, "prompt": "a", "max_tokens": 4, "stream": True, "ignore_eos": True,
    }, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def _greedy_text(client, model, **kwargs):
    return client.completions.create(model=model, prompt="the quick brown fox", temperature=0,
                                     max_tokens=24, extra_body={"ignore_eos": True}, **kwargs).choices[0].text


def test_request_stop_is_honoured(served_app):
    client = served_app.client()
    text = _greedy_text(client, TINY_A)
    assert len(text) > 6
    stop = text[3:6]
    stopped = client.completions.create(model=TINY_A, prompt="the quick brown fox", temperature=0,
                                        max_tokens=24, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_config_stopping_sequences_are_added(served_app, tiny_model_path):
    """tiny-format's config stops at ' jumps jumps'; a logit bias makes both models write it."""
    from transformers import AutoTokenizer

    token_id = AutoTokenizer.from_pretrained(str(tiny_model_path)).convert_tokens_to_ids(FORCED_TOKEN)
    client = served_app.client()
    forced = dict(prompt="the", temperature=0, max_tokens=6, logit_bias={str(token_id): 100},
                  extra_body={"ignore_eos": True})
    unstopped = client.completions.create(model=TINY_A, **forced).choices[0]
    assert unstopped.text == " jumps" * 6 and unstopped.finish_reason == "length"
    stopped = client.completions.create(model=TINY_B, stop=["zzz"], **forced).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == ""


def test_n_choices(served_app):
    result = served_app.client().chat.completions.create(
        model=TINY_A, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in result.choices) == [0, 1]
    assert result.usage.completion_tokens == 8


def test_seed_is_reproducible(served_app):
    client = served_app.client()
    runs = [
        client.completions.create(model=TINY_A, prompt="alpha beta", temperature=1.0, seed=1234,
                                  max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
        for _ in range(2)
    ]
    other = client.completions.create(model=TINY_A, prompt="alpha beta", temperature=1.0, seed=99,
                                      max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_generate_kwargs_defaults_and_override(served_app):
    client = served_app.client()
    defaulted = client.chat.completions.create(model=TINY_B, messages=[{"role": "user", "content": "x"}],
                                               extra_body={"ignore_eos": True})
    assert defaulted.usage.completion_tokens == 5  # generate_kwargs.max_tokens
    overridden = client.chat.completions.create(model=TINY_B, messages=[{"role": "user", "content": "x"}],
                                                max_tokens=9, extra_body={"ignore_eos": True})
    assert overridden.usage.completion_tokens == 9


def test_prompt_format_is_used(served_app):
    """tiny-format renders '[INST]<<SYS>>s<</SYS>>hi[/INST]': more prompt tokens than the bare text."""
    client = served_app.client()
    with_system = client.chat.completions.create(
        model=TINY_B, messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    tokenizer_count = client.completions.create(model=TINY_B, prompt="[INST]<<SYS>>s<</SYS>>hi[/INST]",
                                                max_tokens=1).usage.prompt_tokens
    assert with_system.usage.prompt_tokens == tokenizer_count


def test_logprobs_and_json_schema(served_app):
    client = served_app.client()
    result = client.chat.completions.create(
        model=TINY_A, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    structured = client.chat.completions.create(
        model=TINY_A, messages=[{"role": "user", "content": "json"}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    if structured.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(structured.choices[0].message.content)["a"], int)
    else:  # a random model may run out of tokens inside the number, but stays on the grammar
        assert structured.choices[0].message.content.startswith('{')


def test_unknown_model_is_404(served_app):
    with pytest.raises(openai.NotFoundError) as info:
        served_app.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    error = info.value.body
    assert info.value.status_code == 404
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert TINY_A in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": TINY_A, "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"model": TINY_A, "messages": []}, None),  # vLLM names no param for an empty conversation
    ({"model": TINY_A, "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": TINY_A, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
])
def test_bad_parameters_are_400(served_app, body, param):
    """vLLM's validation answers (its error types, e.g. BadRequestError, and `body.`-prefixed
    params for schema errors); the missing model is the router's own (invalid_request_error)."""
    response = httpx.post(headers=served_app.headers, url=f"{served_app.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] in {"BadRequestError", "invalid_request_error"} and error["message"]
    if param is not None:
        assert error["param"] in {param, f"body.{param}"}


def test_malformed_json_is_400(served_app):
    response = httpx.post(f"{served_app.base_url}/chat/completions", content=b"{not json",
                          headers={**served_app.headers, "content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long_is_400(served_app, stream):
    with pytest.raises(openai.BadRequestError) as info:
        served_app.client().completions.create(model=TINY_A, prompt="hello world " * 400, max_tokens=4,
                                               stream=stream)
    assert info.value.status_code == 400 and "512" in info.value.body["message"]


def test_max_tokens_beyond_context_is_400(served_app):
    with pytest.raises(openai.BadRequestError) as info:
        served_app.client().chat.completions.create(model=TINY_A, messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=5000)
    assert info.value.body["param"] == "max_tokens"


@pytest.mark.slow
def test_default_model_knows_paris(served_app):
    result = served_app.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=30)
    assert "Paris" in result.choices[0].message.content


def test_streams_travel_on_the_replica_channel(served_app):
    """Streamed bytes come over the replica's stream channel (on loopback here), in order."""
    from ray import serve

    from rayllm_app.replica.deployment import deployment_name

    client = served_app.client()
    stream = client.completions.create(model=TINY_A, prompt="channel check", max_tokens=12, stream=True,
                                       logprobs=1, extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    tokens = [t for c in chunks if c.choices for t in (c.choices[0].logprobs.tokens or [])]
    assert len(tokens) == 12 and chunks[-1].usage.completion_tokens == 12
    info = serve.get_deployment_handle(deployment_name(TINY_A), app_name="rayllm").replica_info.remote().result(
        timeout_s=60)
    channel = info["stream_channel"]
    assert channel is not None and channel["host"] == "127.0.0.1" and channel["routers"] >= 1
