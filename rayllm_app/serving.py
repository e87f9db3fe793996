"""OpenAI serving logic for one model: requests in, response bytes or SSE frames out.

It runs inside the model replica, so the router only forwards bytes: no JSON is decoded
and re-encoded between the engine and the client. Validation errors surface before the
first byte of a stream, so they still get their HTTP status; later failures become an
SSE ``error`` event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rayllm_app.config import ModelConfig
from rayllm_app.engine import ChoiceDelta, TokenLogprob
from rayllm_app.errors import ErrorReply, InvalidRequestError, OpenAIError
from rayllm_app.metrics import ModelMetrics, RequestTimer, record_request, record_stream
from rayllm_app.prompt_format import render_chat
from rayllm_app.protocol import ChatCompletionRequest, CompletionRequest
from rayllm_app.sampling import build_sampling_kwargs

DONE = b"data: [DONE]\n\n"


class Engine(Protocol):
    tokenizer: Any
    context_length: int

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any],
                 request_id: str) -> AsyncIterator[list[ChoiceDelta]]: ...


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    return _encode(obj).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class ChunkFramer:
    """SSE frames of one stream's chunks, ``{**head, "choices": [...], "usage": ...}``.

    The head (id, object, created, model) is the same in every chunk, so it is encoded once;
    each chunk encodes only its choices. Byte for byte what ``sse({**head, ...})`` gives.
    """

    __slots__ = ("prefix",)

    def __init__(self, head: dict[str, Any]) -> None:
        self.prefix = b"data: " + dumps(head)[:-1] + b',"choices":'

    def frame(self, choices: list[dict[str, Any]], usage: dict[str, int] | None, with_usage: bool) -> bytes:
        if with_usage:
            return self.prefix + dumps(choices) + b',"usage":' + dumps(usage) + b"}\n\n"
        return self.prefix + dumps(choices) + b"}\n\n"


@dataclass
class Prepared:
    """One prompt ready for the engine."""

    prompt_text: str
    prompt_ids: list[int]
    sampling: dict[str, Any]


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offset: int = 0


def chat_logprobs(items: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(item.token, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top[:top_n]]}
            for item in items
        ]
    }


def completion_logprobs(items: list[TokenLogprob], top_n: int, start_offset: int) -> dict[str, Any]:
    offsets, offset = [], start_offset
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [dict(item.top[:top_n]) for item in items],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def merge_streams(streams: list[AsyncIterator[list[ChoiceDelta]]]
                        ) -> AsyncIterator[tuple[int, list[ChoiceDelta]]]:
    """Interleave several prompts' streams, tagged with the prompt's position."""
    if len(streams) == 1:
        async for deltas in streams[0]:
            yield 0, deltas
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(position: int, stream: AsyncIterator[list[ChoiceDelta]]) -> None:
        try:
            async for deltas in stream:
                await queue.put((position, deltas))
        except BaseException as error:  # surfaced to the consumer below
            await queue.put((position, error))
            return
        await queue.put((position, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()


class ModelServing:
    """Chat and text completions for one model over an engine."""

    def __init__(self, config: ModelConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.model_id = config.model_id
        self.generation = config.engine_config.generation
        self.metrics = ModelMetrics(self.model_id)

    # ------------------------------------------------------------ preparation

    def _prepare(self, request: ChatCompletionRequest | CompletionRequest, prompt_text: str,
                 prompt_ids: list[int]) -> Prepared:
        sampling = build_sampling_kwargs(request, self.generation, prompt_tokens=len(prompt_ids),
                                         context_length=self.engine.context_length)
        return Prepared(prompt_text, prompt_ids, sampling)

    def prepare_chat(self, request: ChatCompletionRequest) -> list[Prepared]:
        prompt, add_special = render_chat(self.generation.prompt_format, self.engine.tokenizer, request.messages)
        return [self._prepare(request, prompt, self.engine.encode(prompt, add_special_tokens=add_special))]

    def prepare_completion(self, request: CompletionRequest) -> list[Prepared]:
        prepared = []
        for prompt in request.prompts():
            if isinstance(prompt, str):
                ids = self.engine.encode(prompt, add_special_tokens=True)
                text = prompt
            else:
                vocab = len(self.engine.tokenizer)
                if any(not 0 <= t < vocab for t in prompt):
                    raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
                ids, text = list(prompt), self.engine.decode(list(prompt)) if request.echo else ""
            if not ids:
                raise InvalidRequestError("The prompt is empty after tokenization.", param="prompt")
            prepared.append(self._prepare(request, text, ids))
        return prepared

    def _streams(self, prepared: list[Prepared], request_id: str) -> AsyncIterator[tuple[int, list[ChoiceDelta]]]:
        return merge_streams([
            self.engine.generate(p.prompt_ids, p.sampling, f"{request_id}-{i}") for i, p in enumerate(prepared)
        ])

    # ------------------------------------------------------------ non-streaming

    async def _collect(self, prepared: list[Prepared], request_id: str, n: int,
                       timer: RequestTimer) -> list[ChoiceState]:
        states = [ChoiceState() for _ in range(len(prepared) * n)]
        async for position, deltas in self._streams(prepared, request_id):
            timer.chunk(position, deltas)
            for delta in deltas:
                state = states[position * n + delta.index]
                state.text.append(delta.text)
                state.tokens += delta.num_tokens
                state.finish_reason = delta.finish_reason or state.finish_reason
                if delta.logprobs:
                    state.logprobs.extend(delta.logprobs)
        return states

    @record_request
    async def chat(self, request: ChatCompletionRequest, timer: RequestTimer) -> bytes | ErrorReply:
        try:
            prepared = self.prepare_chat(request)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            states = await self._collect(prepared, request_id, request.n, timer)
        except OpenAIError as error:
            return error.to_wire()
        top_n = request.top_logprobs or 0
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(s.text)},
                "logprobs": chat_logprobs(s.logprobs, top_n) if request.logprobs else None,
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(states)
        ]
        return dumps({
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id, "choices": choices, "system_fingerprint": None,
            "usage": usage(len(prepared[0].prompt_ids), sum(s.tokens for s in states)),
        })

    @record_request
    async def completion(self, request: CompletionRequest, timer: RequestTimer) -> bytes | ErrorReply:
        try:
            prepared = self.prepare_completion(request)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            states = await self._collect(prepared, request_id, request.n, timer)
        except OpenAIError as error:
            return error.to_wire()
        choices = []
        for i, state in enumerate(states):
            prefix = prepared[i // request.n].prompt_text if request.echo else ""
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(state.logprobs, request.logprobs, len(prefix))
            choices.append({"index": i, "text": prefix + "".join(state.text), "logprobs": logprobs,
                            "finish_reason": state.finish_reason})
        return dumps({
            "id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": self.model_id, "choices": choices, "system_fingerprint": None,
            "usage": usage(sum(len(p.prompt_ids) for p in prepared), sum(s.tokens for s in states)),
        })

    # ------------------------------------------------------------ streaming

    async def _stream(self, request: ChatCompletionRequest | CompletionRequest, prepared: list[Prepared],
                      head: dict[str, Any], render: Callable[[ChoiceDelta, int, ChoiceState], dict[str, Any] | None],
                      opening: Callable[[], bytes], timer: RequestTimer) -> AsyncIterator[bytes | ErrorReply]:
        """Frame engine deltas as SSE; hold the opening frame until the first delta so a
        failure before any output still gets a proper HTTP status."""
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(include_usage and options.continuous_usage_stats)  # vLLM's per-chunk usage
        prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
        states = [ChoiceState() for _ in range(len(prepared) * request.n)]
        framer = ChunkFramer(head)
        started = False
        try:
            async for position, deltas in self._streams(prepared, head["id"]):
                timer.chunk(position, deltas)
                choices = []
                for delta in deltas:
                    index = position * request.n + delta.index
                    state = states[index]
                    state.tokens += delta.num_tokens
                    rendered = render(delta, index, state)
                    if rendered is not None:
                        choices.append(rendered)
                if not choices:
                    continue
                chunk_usage = usage(prompt_tokens, sum(s.tokens for s in states)) if continuous else None
                frame = framer.frame(choices, chunk_usage, include_usage)
                if not started:
                    started = True
                    frame = opening() + frame
                yield frame
        except OpenAIError as error:
            if not started:
                yield error.to_wire()
                return
            timer.status = error.status_code  # counted as failed though the client saw a 200
            yield sse(error.to_dict()) + DONE
            return
        if not started and (frame := opening()):
            yield frame
        if include_usage:
            yield framer.frame([], usage(prompt_tokens, sum(s.tokens for s in states)), True) + DONE
        else:
            yield DONE

    @record_stream
    async def chat_stream(self, request: ChatCompletionRequest,
                          timer: RequestTimer) -> AsyncIterator[bytes | ErrorReply]:
        try:
            prepared = self.prepare_chat(request)
        except OpenAIError as error:
            yield error.to_wire()
            return
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model_id, "system_fingerprint": None}
        top_n = request.top_logprobs or 0

        usage_key = {"usage": None} if request.stream_options and request.stream_options.include_usage else {}

        def opening() -> bytes:
            return sse({**head, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(request.n)
            ], **usage_key})

        def render(delta: ChoiceDelta, index: int, state: ChoiceState) -> dict[str, Any] | None:
            if not (delta.text or delta.finish_reason or delta.logprobs):
                return None
            return {"index": index, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": chat_logprobs(delta.logprobs, top_n) if delta.logprobs else None,
                    "finish_reason": delta.finish_reason}

        async for item in self._stream(request, prepared, head, render, opening, timer):
            yield item

    @record_stream
    async def completion_stream(self, request: CompletionRequest,
                                timer: RequestTimer) -> AsyncIterator[bytes | ErrorReply]:
        try:
            prepared = self.prepare_completion(request)
        except OpenAIError as error:
            yield error.to_wire()
            return
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_id, "system_fingerprint": None}
        echoed: set[int] = set()

        def render(delta: ChoiceDelta, index: int, state: ChoiceState) -> dict[str, Any] | None:
            text = delta.text
            if request.echo and index not in echoed:
                echoed.add(index)
                text = prepared[index // request.n].prompt_text + text
                state.text_offset = len(prepared[index // request.n].prompt_text)
            if not (text or delta.finish_reason or delta.logprobs):
                return None
            logprobs = None
            if request.logprobs is not None and delta.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs, request.logprobs, state.text_offset)
                state.text_offset += sum(len(item.token) for item in delta.logprobs)
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

        async for item in self._stream(request, prepared, head, render, lambda: b"", timer):
            yield item
