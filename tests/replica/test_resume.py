"""Token tracking and resumption on the replica (rayllm_app.replica.resume), with a fake engine
and a fake serving layer shaped like vLLM's chat stream; the real engine's path is in
tests/e2e/test_migration_e2e.py."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import enum
from typing import Any

import pytest

from rayllm_app.errors import ReplicaFailedError
from rayllm_app.replica.resume import STREAM_TOKENS, TOKENS_KEY, ResumeRequest, StreamTokens
from rayllm_app.replica.usage_meter import _metered_generate


class Kind(enum.Enum):
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass
class Params:
    max_tokens: int | None = 10
    min_tokens: int = 0
    n: int = 1
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: Kind = Kind.DELTA

    def clone(self) -> Params:
        return copy.copy(self)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: Any = None
    index: int = 0


@dataclasses.dataclass
class Output:
    outputs: list[Completion]
    prompt_token_ids: list[int] | None = None
    finished: bool = False


class Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


def outputs(prompt: list[int], tokens: list[int], texts: list[str] | None = None) -> list[Output]:
    texts = texts if texts is not None else [f"<{t}>" for t in tokens]
    return [Output([Completion(text, [token], finish_reason="length" if i == len(tokens) - 1 else None)],
                   prompt if i == 0 else None, finished=i == len(tokens) - 1)
            for i, (token, text) in enumerate(zip(tokens, texts))]


async def engine(items: list[Output]):
    for item in items:
        await asyncio.sleep(0)
        yield item


def serving_app(tracker: StreamTokens, items: list[Output], prompt: dict, params: Params):
    """vLLM's chat stream in miniature, on the engine client as the replica meters it: a role
    chunk on the first output, a chunk per output with text, then [DONE]; every chunk carries
    the stream's created (5)."""
    generate = _metered_generate(lambda *args, **kwargs: engine(items), lambda: None)

    async def app(scope, receive, send):
        STREAM_TOKENS.set(tracker)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        first = True
        async for output in generate(prompt, params):
            if first:
                await send({"type": "http.response.body", "body": b'data: {"created":5,"role":1}\n\n',
                            "more_body": True})
                first = False
            text = output.outputs[0].text
            if text:
                await send({"type": "http.response.body", "body": b'data: {"created":5,"c":"%s"}\n\n'
                            % text.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def run_app(tracker: StreamTokens, items: list[Output], prompt: dict,
            params: Params) -> list[tuple[bytes, list[int] | None]]:
    sent: list[tuple[bytes, list[int] | None]] = []

    def deliver(message):
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append((message["body"], message.get(TOKENS_KEY)))

    async def send(message):
        deliver(message)

    send.deliver = deliver
    asyncio.run(tracker.app(serving_app(tracker, items, prompt, params))({}, None, send))
    return sent


def test_each_outputs_ids_ride_on_its_last_chunk():
    tracker = StreamTokens()
    # The second output's text is held back (an incomplete character): its id waits for the next chunk.
    sent = run_app(tracker, outputs([1, 2], [7, 8, 9], ["<7>", "", "<8><9>"]), {"prompt_token_ids": [1, 2]}, Params())
    assert tracker.tracking
    assert sent == [(b'data: {"created":5,"role":1}\n\n', None),   # the role chunk: no token yet
                    (b'data: {"created":5,"c":"<7>"}\n\n', [7]),
                    (b'data: {"created":5,"c":"<8><9>"}\n\n', [8, 9]),
                    (b"data: [DONE]\n\n", None)]


def test_requests_that_are_not_one_delta_stream_are_not_tracked():
    for params in (Params(n=2), Params(output_kind=Kind.FINAL_ONLY)):
        tracker = StreamTokens()
        tracker.prepare({"prompt_token_ids": [1]}, params)
        assert not tracker.tracking
    with pytest.raises(ReplicaFailedError):  # and one of them cannot be resumed
        StreamTokens(ResumeRequest((7,), 5)).prepare({"prompt_token_ids": [1]}, Params(n=2))


def test_a_resumed_stream_continues_from_the_delivered_tokens():
    tracker = StreamTokens(ResumeRequest((7, 8), created=3), Tokenizer())
    prompt, params = tracker.prepare({"type": "token", "prompt_token_ids": [1, 2]}, Params(max_tokens=10, min_tokens=5))
    assert prompt == {"type": "token", "prompt_token_ids": [1, 2, 7, 8]}
    assert (params.max_tokens, params.min_tokens) == (8, 3)
    assert tracker.replay_text == "<7><8>" and tracker.held_text == ""
    seen: list[Output] = []
    original = tracker.follow

    async def spying(items):
        async for output in original(items):
            seen.append(copy.deepcopy(output))
            yield output

    tracker.follow = spying  # type: ignore[method-assign]
    sent = run_app(tracker, [Output([Completion("<9>", [9])], [1, 2, 7, 8]),
                             Output([Completion("<4>", [4], finish_reason="length")], None, True)],
                   {"type": "token", "prompt_token_ids": [1, 2]}, Params(max_tokens=10, min_tokens=5))
    # The layer saw the replay first (the delivered ids and text, under the client's prompt) ...
    assert seen[0].outputs[0].token_ids == [7, 8] and seen[0].outputs[0].text == "<7><8>"
    assert seen[0].prompt_token_ids == [1, 2] and seen[1].prompt_token_ids == [1, 2]
    # ... whose bytes (role chunk included) were dropped; the rest has the original created.
    assert sent == [(b'data: {"created":3,"c":"<9>"}\n\n', [9]), (b'data: {"created":3,"c":"<4>"}\n\n', [4]),
                    (b"data: [DONE]\n\n", None)]


def test_text_held_for_a_stop_string_is_sent_after_a_resume():
    tracker = StreamTokens(ResumeRequest((7, 8), created=None), Tokenizer())
    tracker.prepare({"prompt_token_ids": [1]}, Params(stop=["xyz!"]))
    # vLLM held back the last 3 characters of "<7><8>" at the break: the client has "<7>".
    assert (tracker.replay_text, tracker.held_text) == ("<7>", "<8>")
    sent = run_app(tracker, [Output([Completion("<9>", [9], finish_reason="length")], [1, 7, 8], True)],
                   {"prompt_token_ids": [1]}, Params(stop=["xyz!"]))
    assert sent[0] == (b'data: {"created":5,"c":"<8><9>"}\n\n', [9])


def test_a_break_after_the_last_token_ends_the_stream_without_new_tokens():
    tracker = StreamTokens(ResumeRequest((7, 8), created=None), Tokenizer())
    _, params = tracker.prepare({"prompt_token_ids": [1]}, Params(max_tokens=2))
    assert params.max_tokens == 1 and tracker.remaining == 0
    sent = run_app(tracker, [Output([Completion("<9>", [9])], [1, 7, 8])], {"prompt_token_ids": [1]},
                   Params(max_tokens=2))
    assert sent == [(b"data: [DONE]\n\n", None)]  # nothing generated past max_tokens


def test_an_error_event_from_a_dead_engine_becomes_a_replica_failure():
    tracker = StreamTokens(engine_dead=lambda: True)
    tracker.prepare({"prompt_token_ids": [1]}, Params())

    async def app(scope, receive, send):
        await send({"type": "http.response.body", "body": b'data: {"error": {}}\n\n', "more_body": True})

    async def send(message):
        pass

    send.deliver = lambda message: None

    with pytest.raises(ReplicaFailedError) as failure:
        asyncio.run(tracker.app(app)({}, None, send))
    assert failure.value.reason == "engine_died"


class ByteTokenizer(Tokenizer):
    """Token 99 is the first byte of "é" (98 the second): alone at the end it decodes to U+FFFD."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = ""
        for i, token in enumerate(ids):
            if token == 99:
                text += "é" if i + 1 < len(ids) and ids[i + 1] == 98 else ("\ufffd" if i + 1 == len(ids) else "?")
            elif token != 98:
                text += f"<{token}>"
        return text


def test_a_resume_restarts_at_the_last_whole_character():
    """The client got empty text for token 99 (half a character): the continuation starts before
    it, so the new engine generates it again and sends the character whole."""
    tracker = StreamTokens(ResumeRequest((7, 99), created=None), ByteTokenizer())
    prompt, params = tracker.prepare({"prompt_token_ids": [1]}, Params(max_tokens=10))
    assert tracker.kept == 1 and prompt["prompt_token_ids"] == [1, 7] and params.max_tokens == 9
    assert tracker.replay_text == "<7>"
    from rayllm_app.replica.http_forward import Reply
    from rayllm_app.replica.resume import KEPT_HEADER

    reply = tracker.reply(Reply(200, b"x", {"content-type": "text/event-stream"}))
    assert reply.headers[KEPT_HEADER] == "1" and reply.tokens == ()
