"""Which requests the router resumes on another replica when theirs fails, and how.

A stream of chat or text completions with one choice is *tracked*: its replica sends the
token ids behind every chunk (rayllm_app.replica.resume). When the replica dies, stalls or
loses its engine mid-stream, the router calls another replica with the same body, the ids the
client already has, and the stream's id and ``created``; that replica continues where the
client's text stops, so the client sees one stream (rayllm_app.router.streaming).

What is not tracked, and why:
- ``n`` > 1, beam search, batched prompts: several sequences per request;
- structured outputs (``response_format`` json, ``structured_outputs``, a named or
  ``required`` tool choice): the grammar's state cannot be carried to another engine, and a
  grammar restarted mid-answer would constrain the continuation wrongly;
- Responses and Anthropic Messages streams: their events carry sequence numbers and item
  ids a continuation cannot reproduce yet.
Those, and every request that fails before its first byte reaches the client, are re-run
from the start instead (nothing was sent), up to the same ``migration_limit``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from rayllm_app.errors import OpenAIError, ReplicaFailedError

TRACKED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
MAX_REJECTIONS = 20
REJECTION_BACKOFF_S = 0.05
_GRAMMAR_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
_ID = re.compile(rb'"id":"(?:chatcmpl|cmpl)-([^"]+)"')
_CREATED = re.compile(rb'"created":(\d+)')


def trackable(path: str, data: dict[str, Any]) -> bool:
    """Whether this request's stream can be resumed token-exact on another replica."""
    if path not in TRACKED_PATHS or data.get("stream") is not True:
        return False
    if data.get("n") not in (None, 1) or data.get("best_of") not in (None, 1) or data.get("use_beam_search"):
        return False
    response_format = data.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return False
    if any(data.get(name) is not None for name in _GRAMMAR_FIELDS):
        return False
    tool_choice = data.get("tool_choice")
    if tool_choice == "required" or isinstance(tool_choice, dict):
        return False
    prompt = data.get("prompt")
    return not (isinstance(prompt, list) and prompt and not isinstance(prompt[0], int))


class Attempts:
    """A request's moves to another replica: at most ``limit`` after a failure; a replica that
    refused it before starting (an unhealthy one Serve still routes to) costs no move, but
    the retry waits a little longer each time, and at most MAX_REJECTIONS times."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.moves = 0
        self.rejections = 0

    async def allow(self, error: OpenAIError) -> bool:
        if not isinstance(error, ReplicaFailedError) or self.limit <= 0 or error.reason == "not_resumable":
            return False
        if error.reason == "rejected":
            self.rejections += 1
            if self.rejections > MAX_REJECTIONS:
                return False
            await asyncio.sleep(min(REJECTION_BACKOFF_S * self.rejections, 1.0))
            return True
        if self.moves >= self.limit:
            return False
        self.moves += 1
        return True


def stream_identity(first: bytes) -> tuple[str | None, int | None]:
    """The id (without its chatcmpl-/cmpl- prefix) and ``created`` of a stream, from its first
    bytes: the replica that resumes it answers under both."""
    found_id = _ID.search(first)
    found_created = _CREATED.search(first)
    return (found_id.group(1).decode() if found_id else None,
            int(found_created.group(1)) if found_created else None)
