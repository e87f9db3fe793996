"""Unit tests for rayllm_app.serving over a fake engine: response JSON, SSE framing, errors,
choice indexes, echo, batches and logprobs rendering. No Ray, no vLLM engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rayllm_app.config import parse_model_config
from rayllm_app.engine import ChoiceDelta, TokenLogprob
from rayllm_app.errors import ErrorReply, InvalidRequestError, OverloadedError
from rayllm_app.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)
from rayllm_app.serving import DONE, ModelServing

MODEL_ID = "fake-model"
Script = Callable[[list[int], dict[str, Any]], list[Any]]


def two_parts(prompt_ids: list[int], sampling: dict[str, Any]) -> list[Any]:
    """Every choice says 'Hel' then 'lo', finishing on the second piece."""
    n = sampling["n"]
    return [
        [ChoiceDelta(i, "Hel", 1, None) for i in range(n)],
        [ChoiceDelta(i, "lo", 1, "stop") for i in range(n)],
    ]


class FakeEngine:
    """Implements serving.Engine with the tiny tokenizer and a scripted generate()."""

    def __init__(self, tokenizer: Any, script: Script = two_parts, context_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.script = script
        self.calls: list[tuple[list[int], dict[str, Any], str]] = []

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    async def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any],
                       request_id: str) -> AsyncIterator[list[ChoiceDelta]]:
        self.calls.append((prompt_token_ids, sampling, request_id))
        for item in self.script(prompt_token_ids, sampling):
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            yield item


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_path))


@pytest.fixture(scope="module")
def config():
    return parse_model_config({"engine_config": {"model_id": MODEL_ID, "generation": {
        "stopping_sequences": ["<END>"]}}})


@pytest.fixture
def make(tokenizer, config):
    def factory(script: Script = two_parts, context_length: int = 256) -> tuple[ModelServing, FakeEngine]:
        engine = FakeEngine(tokenizer, script, context_length)
        return ModelServing(config, engine), engine

    return factory


def chat_request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello world"}], **fields})


def completion_request(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL_ID, "prompt": "the quick brown fox", **fields})


def run(awaitable):
    return asyncio.run(awaitable)


def collect(stream: AsyncIterator) -> list[Any]:
    async def drain() -> list[Any]:
        return [item async for item in stream]

    return run(drain())


def frames(items: list[Any]) -> list[str]:
    """Split streamed bytes into SSE payloads, checking the framing of each one."""
    assert all(isinstance(item, bytes) for item in items), items
    raw = b"".join(items).decode()
    assert raw.endswith("\n\n")
    parts = raw.split("\n\n")[:-1]
    for part in parts:
        assert part.startswith("data: "), part
        assert "\n" not in part
    return [part[len("data: "):] for part in parts]


def json_frames(payloads: list[str]) -> list[dict[str, Any]]:
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


# ---------------------------------------------------------------- non-streaming


def test_chat_response_validates(make, tokenizer):
    serving, engine = make()
    body = run(serving.chat(chat_request()))
    assert isinstance(body, bytes)
    response = ChatCompletionResponse.model_validate_json(body)
    assert response.model == MODEL_ID and response.id.startswith("chatcmpl-")
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", "Hello")
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    # The chat template writes the special tokens itself.
    expected_ids = tokenizer.encode(
        "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    prompt_ids, sampling, request_id = engine.calls[0]
    assert prompt_ids == expected_ids
    assert request_id.startswith(response.id)
    assert sampling["stop"] == ["<END>"]
    assert sampling["max_tokens"] == 256 - len(expected_ids)
    assert response.usage.model_dump() == {"prompt_tokens": len(expected_ids), "completion_tokens": 2,
                                           "total_tokens": len(expected_ids) + 2}


def test_completion_response_validates(make, tokenizer):
    serving, engine = make()
    body = run(serving.completion(completion_request()))
    response = CompletionResponse.model_validate_json(body)
    assert response.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in response.choices] == [(0, "Hello", "stop")]
    prompt_tokens = len(tokenizer.encode("the quick brown fox", add_special_tokens=True))
    assert response.usage is not None
    assert response.usage.model_dump() == {"prompt_tokens": prompt_tokens, "completion_tokens": 2,
                                           "total_tokens": prompt_tokens + 2}
    assert engine.calls[0][1]["max_tokens"] == 16


def test_chat_n2_indexes(make):
    serving, _ = make()
    response = ChatCompletionResponse.model_validate_json(run(serving.chat(chat_request(n=2))))
    assert [(c.index, c.message.content) for c in response.choices] == [(0, "Hello"), (1, "Hello")]
    assert response.usage.completion_tokens == 4


def test_completion_echo(make):
    serving, _ = make()
    response = CompletionResponse.model_validate_json(run(serving.completion(completion_request(echo=True))))
    assert response.choices[0].text == "the quick brown foxHello"


def test_completion_echo_of_token_prompt_is_decoded(make, tokenizer):
    serving, engine = make()
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    response = CompletionResponse.model_validate_json(
        run(serving.completion(completion_request(prompt=ids, echo=True))))
    assert response.choices[0].text == "hello worldHello"
    assert engine.calls[0][0] == ids


def test_completion_batch_prompts_get_consecutive_indexes(make, tokenizer):
    serving, engine = make()
    response = CompletionResponse.model_validate_json(
        run(serving.completion(completion_request(prompt=["hello world", "one two three"], echo=True))))
    assert [(c.index, c.text) for c in response.choices] == [(0, "hello worldHello"), (1, "one two threeHello")]
    assert len(engine.calls) == 2
    assert engine.calls[0][2] != engine.calls[1][2]  # distinct engine request ids
    expected_prompt = sum(len(tokenizer.encode(p, add_special_tokens=True)) for p in ["hello world", "one two three"])
    assert response.usage is not None
    assert response.usage.prompt_tokens == expected_prompt
    assert response.usage.completion_tokens == 4


def test_completion_batch_with_n2(make):
    serving, _ = make()
    response = CompletionResponse.model_validate_json(
        run(serving.completion(completion_request(prompt=["hello", "world"], n=2, echo=True))))
    assert [(c.index, c.text) for c in response.choices] == [
        (0, "helloHello"), (1, "helloHello"), (2, "worldHello"), (3, "worldHello")]


def test_token_ids_outside_vocab_are_a_400(make, tokenizer):
    serving, engine = make()
    reply = run(serving.completion(completion_request(prompt=[1, len(tokenizer) + 5])))
    assert isinstance(reply, ErrorReply) and reply.status_code == 400
    assert json.loads(reply.body)["error"]["param"] == "prompt"
    assert engine.calls == []


def test_prompt_empty_after_tokenization_is_a_400(make):
    serving, _ = make()
    reply = run(serving.completion(completion_request(prompt="")))
    assert isinstance(reply, ErrorReply) and reply.status_code == 400


def test_prompt_too_long_is_an_error_reply_before_the_engine(make):
    serving, engine = make(context_length=4)
    reply = run(serving.chat(chat_request()))
    assert isinstance(reply, ErrorReply)
    assert reply.status_code == 400
    body = json.loads(reply.body)
    ErrorResponse.model_validate(body)
    assert body["error"]["code"] == "context_length_exceeded"
    assert engine.calls == []


def test_engine_error_non_streaming_is_an_error_reply(make):
    serving, _ = make(lambda ids, s: [OverloadedError("slow down", retry_after_s=3)])
    reply = run(serving.chat(chat_request()))
    assert isinstance(reply, ErrorReply)
    assert reply.status_code == 429 and reply.headers == {"Retry-After": "3"}
    assert json.loads(reply.body)["error"]["message"] == "slow down"


# ---------------------------------------------------------------- streaming chat


def test_chat_stream_framing_and_chunks(make):
    serving, _ = make()
    items = collect(serving.chat_stream(chat_request(stream=True)))
    assert items[-1].endswith(DONE) and DONE == b"data: [DONE]\n\n"
    chunks = json_frames(frames(items))
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert len({c.id for c in parsed}) == 1 and parsed[0].id.startswith("chatcmpl-")
    first = parsed[0].choices
    assert [(c.index, c.delta.role, c.delta.content) for c in first] == [(0, "assistant", "")]
    content = [c.choices[0] for c in parsed[1:]]
    assert "".join(c.delta.content or "" for c in content) == "Hello"
    assert all(c.delta.role is None for c in content)
    assert [c.finish_reason for c in content] == [None, "stop"]
    assert content[-1].delta.content == "lo"  # finish_reason rides on the last content chunk
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_chat_stream_include_usage(make):
    serving, _ = make()
    request = chat_request(stream=True, stream_options={"include_usage": True})
    payloads = frames(collect(serving.chat_stream(request)))
    chunks = json_frames(payloads)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    last = chunks[-1]
    assert last["choices"] == []
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert prompt_tokens > 0
    assert last["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 2,
                             "total_tokens": prompt_tokens + 2}
    assert all(c.get("usage") is None for c in chunks[:-1])
    # the same numbers as the non-streaming answer
    full = ChatCompletionResponse.model_validate_json(run(serving.chat(chat_request())))
    assert full.usage.prompt_tokens == prompt_tokens


def test_chat_stream_n2(make):
    serving, _ = make()
    chunks = json_frames(frames(collect(serving.chat_stream(chat_request(stream=True, n=2)))))
    assert [(c["index"], c["delta"]["role"]) for c in chunks[0]["choices"]] == [(0, "assistant"), (1, "assistant")]
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    for chunk in chunks[1:]:
        ChatCompletionChunk.model_validate(chunk)
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "Hello", 1: "Hello"}
    assert finishes == {0: "stop", 1: "stop"}


def test_chat_stream_separate_finish_delta_and_empty_deltas(make):
    def script(ids, sampling):
        return [[ChoiceDelta(0, "", 0, None)], [ChoiceDelta(0, "Hi", 1, None)], [ChoiceDelta(0, "", 0, "length")]]

    serving, _ = make(script)
    chunks = json_frames(frames(collect(serving.chat_stream(chat_request(stream=True)))))
    assert len(chunks) == 3  # role, "Hi", finish; the empty delta produced no frame
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert chunks[2]["choices"][0]["delta"] == {}
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    ChatCompletionChunk.model_validate(chunks[2])


def test_chat_stream_without_output_still_opens_and_ends(make):
    serving, _ = make(lambda ids, s: [])
    chunks = json_frames(frames(collect(serving.chat_stream(chat_request(stream=True)))))
    assert len(chunks) == 1 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_chat_stream_keeps_non_ascii_text(make):
    serving, _ = make(lambda ids, s: [[ChoiceDelta(0, "héllo ✓", 2, "stop")]])
    payloads = frames(collect(serving.chat_stream(chat_request(stream=True))))
    assert "héllo ✓" in payloads[1]
    assert json.loads(payloads[1])["choices"][0]["delta"]["content"] == "héllo ✓"


def test_error_before_first_delta_is_only_an_error_reply(make):
    serving, _ = make(lambda ids, s: [OverloadedError("too busy")])
    items = collect(serving.chat_stream(chat_request(stream=True)))
    assert len(items) == 1
    reply = items[0]
    assert isinstance(reply, ErrorReply)
    assert reply.status_code == 429
    assert reply.headers["Retry-After"] == "1"
    assert json.loads(reply.body)["error"]["type"] == "rate_limit_error"


def test_error_in_preparation_of_a_stream_is_an_error_reply(make):
    serving, engine = make(context_length=4)
    items = collect(serving.chat_stream(chat_request(stream=True)))
    assert len(items) == 1 and isinstance(items[0], ErrorReply) and items[0].status_code == 400
    items = collect(serving.completion_stream(completion_request(stream=True, suffix="x")))
    assert len(items) == 1 and isinstance(items[0], ErrorReply) and items[0].status_code == 400
    assert engine.calls == []


def test_error_after_output_is_an_sse_error_event_then_done(make):
    def script(ids, sampling):
        return [[ChoiceDelta(0, "Hel", 1, None)], InvalidRequestError("went wrong", param="x")]

    serving, _ = make(script)
    items = collect(serving.chat_stream(chat_request(stream=True)))
    assert not any(isinstance(item, ErrorReply) for item in items)
    payloads = frames(items)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    ErrorResponse.model_validate(error)
    assert error["error"]["message"] == "went wrong" and error["error"]["param"] == "x"
    assert json.loads(payloads[1])["choices"][0]["delta"]["content"] == "Hel"
    assert len(payloads) == 4  # role, "Hel", error, [DONE]


# ---------------------------------------------------------------- streaming completions


def test_completion_stream_framing(make):
    serving, _ = make()
    chunks = json_frames(frames(collect(serving.completion_stream(completion_request(stream=True)))))
    for chunk in chunks:
        CompletionResponse.model_validate(chunk)
        assert chunk["object"] == "text_completion"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello"  # no role frame for completions
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]


def test_completion_stream_include_usage(make, tokenizer):
    serving, _ = make()
    request = completion_request(stream=True, stream_options={"include_usage": True})
    chunks = json_frames(frames(collect(serving.completion_stream(request))))
    prompt_tokens = len(tokenizer.encode("the quick brown fox", add_special_tokens=True))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 2,
                                   "total_tokens": prompt_tokens + 2}
    CompletionResponse.model_validate(chunks[-1])


def test_completion_stream_echo_and_batch(make):
    serving, _ = make()
    request = completion_request(stream=True, echo=True, prompt=["hello", "world"])
    chunks = json_frames(frames(collect(serving.completion_stream(request))))
    texts: dict[int, str] = {}
    for chunk in chunks:
        CompletionResponse.model_validate(chunk)
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "helloHello", 1: "worldHello"}


def test_completion_stream_error_after_output(make):
    serving, _ = make(lambda ids, s: [[ChoiceDelta(0, "a", 1, None)], OverloadedError("busy")])
    payloads = frames(collect(serving.completion_stream(completion_request(stream=True))))
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "overloaded"


# ---------------------------------------------------------------- logprobs


TOPS = [("Hel", -0.1), ("He", -1.0), ("H", -2.0), ("X", -3.0)]


def logprob_script(ids, sampling):
    return [
        [ChoiceDelta(0, "Hel", 1, None, [TokenLogprob("Hel", -0.1, TOPS)])],
        [ChoiceDelta(0, "lo✓", 2, "stop", [TokenLogprob("lo", -0.2, [("lo", -0.2), ("la", -2.0)]),
                                             TokenLogprob("✓", -0.3, [("✓", -0.3)])])],
    ]


def test_chat_logprobs_rendering(make):
    serving, engine = make(logprob_script)
    response = ChatCompletionResponse.model_validate_json(
        run(serving.chat(chat_request(logprobs=True, top_logprobs=2))))
    assert engine.calls[0][1]["logprobs"] == 2
    content = response.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in content] == [("Hel", -0.1), ("lo", -0.2), ("✓", -0.3)]
    assert content[2].bytes == list("✓".encode())
    assert [len(t.top_logprobs) for t in content] == [2, 2, 1]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hel", -0.1), ("He", -1.0)]
    assert content[0].top_logprobs[1].bytes == list(b"He")


def test_chat_logprobs_without_top(make):
    serving, _ = make(logprob_script)
    response = ChatCompletionResponse.model_validate_json(run(serving.chat(chat_request(logprobs=True))))
    assert all(t.top_logprobs == [] for t in response.choices[0].logprobs.content)


def test_chat_stream_logprobs(make):
    serving, _ = make(logprob_script)
    chunks = json_frames(frames(collect(serving.chat_stream(chat_request(stream=True, logprobs=True,
                                                                              top_logprobs=1)))))
    entries = []
    for chunk in chunks[1:]:
        ChatCompletionChunk.model_validate(chunk)
        entries.extend(chunk["choices"][0]["logprobs"]["content"])
    assert [e["token"] for e in entries] == ["Hel", "lo", "✓"]
    assert all(len(e["top_logprobs"]) == 1 for e in entries)
    assert entries[0]["bytes"] == list(b"Hel")


def test_completion_logprobs_rendering(make):
    serving, engine = make(logprob_script)
    response = CompletionResponse.model_validate_json(run(serving.completion(completion_request(logprobs=3))))
    assert engine.calls[0][1]["logprobs"] == 3
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["Hel", "lo", "✓"]
    assert logprobs.token_logprobs == [-0.1, -0.2, -0.3]
    assert logprobs.text_offset == [0, 3, 5]
    assert logprobs.top_logprobs[0] == {"Hel": -0.1, "He": -1.0, "H": -2.0}
    assert [len(t) for t in logprobs.top_logprobs] == [3, 2, 1]


def test_completion_logprobs_offsets_with_echo(make):
    serving, _ = make(logprob_script)
    request = completion_request(prompt="abcd", echo=True, logprobs=1)
    response = CompletionResponse.model_validate_json(run(serving.completion(request)))
    assert response.choices[0].text == "abcdHello✓"
    assert response.choices[0].logprobs.text_offset == [4, 7, 9]


def test_completion_stream_logprobs_offsets_continue(make):
    serving, _ = make(logprob_script)
    for echo, start in ((False, 0), (True, len("abcd"))):
        request = completion_request(prompt="abcd", echo=echo, logprobs=1, stream=True)
        chunks = json_frames(frames(collect(serving.completion_stream(request))))
        offsets, tokens = [], []
        for chunk in chunks:
            CompletionResponse.model_validate(chunk)
            offsets += chunk["choices"][0]["logprobs"]["text_offset"]
            tokens += chunk["choices"][0]["logprobs"]["tokens"]
        assert tokens == ["Hel", "lo", "✓"]
        assert offsets == [start, start + 3, start + 5], echo


def test_no_logprobs_when_not_requested(make):
    serving, engine = make(logprob_script)
    response = CompletionResponse.model_validate_json(run(serving.completion(completion_request())))
    assert response.choices[0].logprobs is None
    assert "logprobs" not in engine.calls[0][1]
    chat = ChatCompletionResponse.model_validate_json(run(serving.chat(chat_request())))
    assert chat.choices[0].logprobs is None


@pytest.mark.parametrize("usage_value, with_usage", [(None, False), (None, True),
                                                     ({"prompt_tokens": 3, "completion_tokens": 2,
                                                       "total_tokens": 5}, True)])
def test_chunk_framer_matches_encoding_the_whole_chunk(usage_value, with_usage):
    from rayllm_app.serving import ChunkFramer, sse

    head = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "m/ü \"q\"",
            "system_fingerprint": None}
    choices = [{"index": 0, "text": "héllo\n\"x\" ✓", "logprobs": None, "finish_reason": None},
               {"index": 1, "text": "", "logprobs": None, "finish_reason": "length"}]
    expected = sse({**head, "choices": choices, **({"usage": usage_value} if with_usage else {})})
    assert ChunkFramer(head).frame(choices, usage_value, with_usage) == expected
    assert json.loads(expected[len(b"data: "):])["choices"][0]["text"] == "héllo\n\"x\" ✓"


def test_engine_drops_only_vllms_unread_prometheus_logger():
    """The replica keeps its rayllm_ logger and vLLM's log lines; the Prometheus one goes."""
    pytest.importorskip("vllm")
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from rayllm_app.engine import _drop_unread_prometheus_logger

    class Manager:
        def __init__(self, loggers: list[Any]) -> None:
            self.stat_loggers = loggers

    class Engine:
        def __init__(self, manager: Any) -> None:
            self.logger_manager = manager

    ours, logging_logger = object(), object()
    prometheus = object.__new__(PrometheusStatLogger)
    engine = Engine(Manager([ours, logging_logger, prometheus]))
    _drop_unread_prometheus_logger(engine)
    assert engine.logger_manager.stat_loggers == [ours, logging_logger]
    _drop_unread_prometheus_logger(Engine(None))  # stats disabled: nothing to drop, no error


def test_engine_takes_vllm_serves_batch_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """AsyncLLM defaults to the engine context, whose batch limits are lower than `vllm serve`'s
    on every GPU; the replica is an OpenAI server and must say so."""
    pytest.importorskip("vllm")
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from rayllm_app.config import parse_model_config
    from rayllm_app.engine import VLLMEngine

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def from_engine_args(args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, model=args.model)
        raise Stop

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(from_engine_args))
    config = parse_model_config({"engine_config": {"model_id": "m", "hf_model_id": "org/m"}})
    with pytest.raises(Stop):
        VLLMEngine.start(config, str(tmp_path))
    assert seen["model"] == str(tmp_path)
    assert seen["usage_context"] is UsageContext.OPENAI_API_SERVER
    assert len(seen["stat_loggers"]) == 1
