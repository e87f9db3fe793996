"""Token-exact stream resumption, the replica's half: which tokens each sent chunk carries,
and how a stream broken on another replica continues here.

Why here: the router relays vLLM's SSE bytes without reading them, so only the replica knows
which engine tokens a chunk of bytes stands for. A :class:`StreamTokens` follows one streamed
request (chat or text completions, one choice):

- **Tracking.** Each engine output's token ids are attached to the *last* body chunk vLLM's
  OpenAI layer writes for that output (the chunk is held until the layer asks the engine for
  the next output, in the same event-loop turn). The channel sends chunk and ids in one frame,
  so the router never counts a token whose text it did not receive. Outputs that produce no
  chunk (a tool-call parser still buffering, text held back for incomplete UTF-8) carry their
  ids to the next chunk.
- **Resuming.** Given the ids the client already has (:class:`ResumeRequest`), the same request
  body runs through vLLM's layer again. The engine is asked to continue from the client's
  prompt plus those ids, for the remaining ``max_tokens``. vLLM's layer is first handed one
  *replay* output holding the delivered ids and their text, so its stream state (usage counts,
  tool-call and reasoning parsers) is what it would have been; the bytes it writes for the
  replay are dropped, because the client has them. Later chunks get the original ``created``
  (the router passes the original id as ``X-Request-Id``), so the client sees one stream.

What it cannot make exact: a stop string that spans the break (the new engine checks stop
strings only in text it generates), and seeded sampling after the break (the new request's
generator restarts from the seed).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayllm_app.errors import ReplicaFailedError

if TYPE_CHECKING:
    from rayllm_app.replica.http_forward import Reply

# What a tracked body message carries besides its bytes (an ASGI message key of ours).
TOKENS_KEY = "rayllm.tokens"
# The resumed stream's Reply says how many delivered tokens it continues after (see _whole).
KEPT_HEADER = "x-rayllm-resumed-after"
_CREATED = re.compile(rb'"created":\d+')
_PROMPT_CONTEXT = 8  # prompt tokens decoded before the replayed ones, so their text is spaced right
_MAX_REGENERATED = 1024  # delivered tokens a resume may generate again (see StreamTokens._whole)


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """Sent with the call that continues a broken stream."""

    tokens: tuple[int, ...]   # every token id the client has received text for, in order
    created: int | None       # the stream's original ``created``


class StreamTokens:
    """One streamed request's tokens: tracked as they are sent, and, when it resumes a broken
    stream, replayed to vLLM's OpenAI layer first (see the module docstring)."""

    def __init__(self, resume: ResumeRequest | None = None, tokenizer: Any = None,
                 engine_dead: Callable[[], bool] = lambda: False) -> None:
        self.resume = resume
        self.tokenizer = tokenizer
        self.engine_dead = engine_dead
        self.tracking = False      # the engine streams this request's outputs as deltas
        self.replaying = resume is not None
        self.remaining = 1         # tokens the engine still may generate (0: the replay ends it)
        self.prompt_ids: list[int] = []
        self.kept = 0              # delivered tokens the continuation starts after (see _whole)
        self.replay_text = ""
        self.held_text = ""        # text vLLM held back for stop-string matching at the break
        self._carry: list[int] = []
        self._staged: dict[str, Any] | None = None
        self._send: Callable[[dict[str, Any]], None] | None = None
        self._created = b'"created":%d' % resume.created if resume and resume.created is not None else None

    # -------------------------------------------------------------- the engine's side

    def prepare(self, prompt: Any, params: Any) -> tuple[Any, Any]:
        """The engine's inputs: unchanged for a new stream, the continuation for a resumed one."""
        kind = getattr(getattr(params, "output_kind", None), "name", "")
        self.tracking = kind == "DELTA" and getattr(params, "n", 1) == 1
        if self.resume is None:
            return prompt, params
        self.replaying = False  # until the continuation is ready: a failure here must reach the client
        if not self.tracking or not isinstance(prompt, dict) or not isinstance(prompt.get("prompt_token_ids"), list):
            raise ReplicaFailedError("This stream cannot be resumed: its request is not one streamed choice of "
                                     "token input.", reason="not_resumable")
        self.prompt_ids = prompt["prompt_token_ids"]
        tokens = self._whole(list(self.resume.tokens), params)
        self.replaying = True
        self.kept = len(tokens)
        self.replay_text, self.held_text = self._texts(tokens, params)
        params = params.clone()
        if params.max_tokens is not None:
            self.remaining = params.max_tokens - len(tokens)
            params.max_tokens = max(self.remaining, 1)
        if getattr(params, "min_tokens", 0):
            params.min_tokens = max(params.min_tokens - len(tokens), 0)
        return {**prompt, "prompt_token_ids": self.prompt_ids + tokens}, params

    def _whole(self, tokens: list[int], params: Any) -> list[int]:
        """The delivered tokens up to the last whole character. Tokens after it hold bytes vLLM
        has not sent text for yet (its detokenizer waits until a character is whole): they are
        generated again (greedy: the same), so the new engine's detokenizer starts at a character
        boundary (primed with a prompt that ends mid-character, it would resend the prompt's text)."""
        if self.tokenizer is None:
            return tokens
        skip = getattr(params, "skip_special_tokens", True)
        context = self.prompt_ids[-_PROMPT_CONTEXT:]
        for end in range(len(tokens), max(len(tokens) - _MAX_REGENERATED, 0) - 1, -1):
            if not self.tokenizer.decode(context + tokens[:end], skip_special_tokens=skip).endswith("\ufffd"):
                return tokens[:end]
        raise ReplicaFailedError("This stream cannot be resumed: its last characters do not decode.",
                                 reason="not_resumable")

    def _texts(self, tokens: list[int], params: Any) -> tuple[str, str]:
        """The delivered tokens' text as vLLM's detokenizer made it, split into what it sent
        and what it still held back for stop-string matching."""
        if self.tokenizer is None or not tokens:
            return "", ""
        skip = getattr(params, "skip_special_tokens", True)
        context = self.prompt_ids[-_PROMPT_CONTEXT:]
        head = self.tokenizer.decode(context, skip_special_tokens=skip)
        full = self.tokenizer.decode(context + tokens, skip_special_tokens=skip)
        text = full[len(head):] if full.startswith(head) else self.tokenizer.decode(tokens, skip_special_tokens=skip)
        stop = getattr(params, "stop", None) or []
        held = max(len(s) for s in stop) - 1 if stop and not getattr(params, "include_stop_str_in_output", False) \
            else 0
        cut = max(len(text) - held, 0)
        return text[:cut], text[cut:]

    async def follow(self, outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A resumed stream's outputs as vLLM's layer should see them: the replay first, then
        the engine's, under the client's prompt. (A new stream's outputs pass untouched; the
        meter commits their ids, see commit.)"""
        try:
            async for output in outputs:
                if output.prompt_token_ids is not None:
                    output.prompt_token_ids = self.prompt_ids
                if self.replaying:
                    yield self._replay(output)
                    self.replaying = False  # the layer has written the replay's bytes (dropped)
                    if self.remaining <= 0:  # the break came after the last token: only the end is left
                        yield self._finished(output)
                        return
                    if self.held_text and output.outputs:
                        output.outputs[0].text = self.held_text + output.outputs[0].text
                yield output
        finally:
            await outputs.aclose()  # closing this stream aborts the engine request now, not at GC

    def _replay(self, output: Any) -> Any:
        replay = copy.copy(output)
        first = output.outputs[0]
        replay.outputs = [dataclasses.replace(
            first, text=self.replay_text, token_ids=list(self.resume.tokens[:self.kept]), finish_reason=None,
            stop_reason=None,
            logprobs=self._replay_logprobs(first.logprobs))]
        replay.finished = False
        return replay

    def _replay_logprobs(self, real: Any) -> Any:
        """Placeholder logprobs for the replayed tokens (their chunks are dropped; the client
        has the real ones), shaped like the engine's."""
        if real is None:
            return None
        sample = next((entry for step in real if step for entry in step.values()), None)
        if sample is None:
            return None
        return [{token: dataclasses.replace(sample, logprob=0.0, rank=1, decoded_token=None)}
                for token in self.resume.tokens[:self.kept]]

    def _finished(self, output: Any) -> Any:
        end = copy.copy(output)
        end.outputs = [dataclasses.replace(output.outputs[0], text=self.held_text, token_ids=[],
                                           logprobs=[] if output.outputs[0].logprobs is not None else None,
                                           finish_reason="length", stop_reason=None)]
        end.finished = True
        return end

    # -------------------------------------------------------------- the application's side

    def reply(self, reply: Reply) -> Reply:
        """The tracked stream's Reply: token ids (none yet is an empty tuple, not None) and,
        resumed, how many delivered tokens it continues after."""
        headers = reply.headers if self.resume is None else {**reply.headers, KEPT_HEADER: str(self.kept)}
        return dataclasses.replace(reply, tokens=reply.tokens or (), headers=headers)

    def app(self, app: Any) -> Any:
        """vLLM's ASGI application with this request's body messages tracked (and, when
        resuming, the replay's bytes dropped)."""

        async def tracked(scope: dict[str, Any], receive: Any, send: Any) -> None:
            self._send = send.deliver  # synchronous: commit runs inside the engine's output loop
            await app(scope, receive, self._on_send)

        return tracked

    async def _on_send(self, message: dict[str, Any]) -> None:
        deliver = self._send
        if message["type"] != "http.response.body":
            deliver(message)
            return
        body = message.get("body", b"")
        if self.replaying:  # the client has these bytes from the replica that failed
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        elif body:
            if body.startswith(b'data: {"error"') and self.engine_dead():
                # The engine died under this stream: let the router resume it on another replica.
                raise ReplicaFailedError("The model's engine stopped during this stream.", reason="engine_died")
            if self._created is not None:
                message = {**message, "body": _CREATED.sub(self._created, body, count=1)}
        staged = self._staged
        if staged is not None:
            self._staged = None
            deliver(staged)
        if body and self.tracking and message.get("more_body", False):
            self._staged = message
            return
        deliver(message)

    def commit(self, tokens: Any) -> None:
        """These tokens' text is written: send the chunk that holds it, with their ids (the
        engine meter calls this when vLLM's layer asks for the next output)."""
        if self.replaying:  # the replay's bytes were dropped; the router has its ids
            return
        staged = self._staged
        if staged is None:
            self._carry.extend(tokens)
            return
        self._staged = None
        if self._carry:
            self._carry.extend(tokens)
            tokens, self._carry = self._carry, []
        self._send({**staged, TOKENS_KEY: tokens})


STREAM_TOKENS: ContextVar[StreamTokens | None] = ContextVar("rayllm_stream_tokens", default=None)
