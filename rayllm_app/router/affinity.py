"""A request's affinity keys: what the model's request router (rayllm_app.routing.prefix_affinity)
uses to send it where its KV cache most likely is (``deployment_config.routing.policy``).

- **session**: one key, for the ``x-session-id`` header, else the body's ``user``; for the
  Responses API, the chain's root (below).
- **prefix_aware**: chained hashes of the prompt's blocks of ``block_chars`` bytes: key i
  stands for the whole prefix up to block i, so two requests share key i exactly when their
  first i+1 blocks match. The prompt is the text the chat template starts from (tools, then each
  message's role and content), as the router sees it without tokenizing; only whole blocks
  count, as only whole blocks are cached. Without a whole block: the session key, if any.

**A Responses chain keeps one root.** The router names each response (``with_response_id``):
``resp_`` + 16 hex digits of the chain's root + 16 random ones. A continuation inherits its
previous response's root, a first turn gets a new one, so every turn of a conversation has
the same key, on every router, after any restart, with nothing stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from rayllm_app.config.routing_config import AFFINITY_POLICIES, RoutingConfig

_OUR_ID = re.compile(r"resp_([0-9a-f]{16})[0-9a-f]{16}")
_SEED = b"rayllm-affinity"


def _key(data: bytes, previous: bytes = _SEED) -> bytes:
    return hashlib.blake2b(data, digest_size=8, key=previous[:64]).digest()


def _as_int(digest: bytes) -> int:
    return int.from_bytes(digest, "big")


def chain_root(previous_response_id: Any) -> str:
    """The root of the chain a new response joins: its previous response's, or a new one."""
    if isinstance(previous_response_id, str) and previous_response_id:
        ours = _OUR_ID.fullmatch(previous_response_id)
        if ours:
            return ours.group(1)
        return hashlib.blake2b(previous_response_id.encode(), digest_size=8).hexdigest()  # a client's own id
    return uuid.uuid4().hex[:16]


def new_response_id(previous_response_id: Any) -> str:
    return f"resp_{chain_root(previous_response_id)}{uuid.uuid4().hex[:16]}"


def session_key(session: str) -> int:
    return _as_int(_key(session.encode()))


def prompt_text(path: str, data: Mapping[str, Any]) -> bytes:
    """The prompt as the router sees it, in the order the model's template renders it."""
    parts: list[str] = []
    if path in ("/v1/chat/completions", "/v1/messages"):
        if data.get("tools"):
            parts.append(json.dumps(data["tools"], sort_keys=True))
        system = data.get("system")  # Anthropic Messages
        if system:
            parts.append(f"system\x00{_content(system)}")
        for message in data.get("messages") or ():
            if isinstance(message, Mapping):
                parts.append(f"{message.get('role')}\x00{_content(message.get('content'))}")
    elif path == "/v1/completions":
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: the first prompt's prefix
        parts.append(prompt if isinstance(prompt, str) else json.dumps(prompt))
    return "\x01".join(parts).encode()


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or json.dumps(part, sort_keys=True) if isinstance(part, Mapping)
                       else str(part) for part in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def prefix_keys(text: bytes, block: int, max_blocks: int) -> tuple[int, ...]:
    """Chained hashes of ``text``'s whole blocks (at most ``max_blocks``)."""
    keys = []
    digest = _SEED
    for start in range(0, min(len(text) // block, max_blocks) * block, block):
        digest = _key(text[start:start + block], digest)
        keys.append(_as_int(digest))
    return tuple(keys)


def affinity_keys(routing: RoutingConfig, path: str, data: Mapping[str, Any], headers: Mapping[str, str],
                  response_id: str | None = None) -> tuple[int, ...]:
    """The request's affinity keys under the model's routing policy; () routes by load alone."""
    if routing.policy not in AFFINITY_POLICIES:
        return ()
    session = headers.get("x-session-id") or data.get("user")
    if not isinstance(session, str) or not session:
        session = None
    if path == "/v1/responses":
        if session is None and response_id is not None:
            ours = _OUR_ID.fullmatch(response_id)
            session = f"chain:{ours.group(1)}" if ours else None
        return (session_key(session),) if session is not None else ()
    if routing.policy == "prefix_aware":
        keys = prefix_keys(prompt_text(path, data), routing.block_chars, routing.max_blocks)
        if keys:
            return keys
    return (session_key(session),) if session is not None else ()
