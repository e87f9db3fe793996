"""Stored Responses (``store: true``), shared by every router and model replica.

vLLM keeps a stored response, and the chat messages its turn was rendered from, in dicts of
the process that answered it: a ``previous_response_id`` sent to any other replica gets 404,
a replica's restart loses them all, and the dicts grow without bound. Here the replica that
answers writes both to a store every process reaches, before the client has the response
(rayllm_app.replica.responses_state); a replica asked to continue a response it does not hold
loads them into its vLLM first, and the router answers GET and DELETE from the store.

``None``/``"embedded"``: a Ray actor with an SQLite file on the head node (no extra service);
a Redis URL: Redis (survives the Ray cluster; production). Both pass the same tests
(tests/conversations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_TTL_S = 30 * 24 * 3600.0  # OpenAI keeps stored responses for 30 days


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response_id: str
    model: str           # the model that answered it
    owner: str | None    # the name of the API key that created it; None on a server without keys
    response: bytes      # the Response object, JSON, as vLLM stored it (what GET returns)
    messages: bytes      # the chat messages vLLM rendered the turn from, JSON (what a continuation extends)

    def visible_to(self, owner: str | None) -> bool:
        return visible(self.owner, owner)


def visible(stored_owner: str | None, caller: str | None) -> bool:
    """Whether a caller may read, continue or delete a stored response: only the key that
    created it (one without an owner was made on a server without keys)."""
    return stored_owner is None or stored_owner == caller


@runtime_checkable
class ResponseStore(Protocol):
    async def put(self, item: StoredResponse) -> None:
        """Store (or replace) one response; it expires after the store's ttl."""

    async def get(self, response_id: str) -> StoredResponse | None:
        """The response, or None if it was never stored, was deleted or expired."""

    async def delete(self, response_id: str) -> bool:
        """Forget the response; False if there was none."""

    async def close(self) -> None:
        """Release connections; the stored responses stay."""


def open_response_store(url: str | None, *, path: str | None = None, ttl_s: float = DEFAULT_TTL_S,
                        prefix: str = "rayllm:") -> ResponseStore:
    """The store a ``responses_store`` setting names: None or "embedded" (the file at ``path``),
    or a Redis URL."""
    if url is None or url.strip() == "embedded":
        from rayllm_app.conversations.embedded_store import EmbeddedResponseStore

        return EmbeddedResponseStore(path, ttl_s)
    if url.startswith(REDIS_SCHEMES):
        from rayllm_app.conversations.redis_store import RedisResponseStore

        return RedisResponseStore(url, ttl_s, prefix=prefix)
    raise ValueError(
        f"unknown responses store {url!r}: use 'embedded' (or leave it unset) for the built-in Ray "
        "actor with a file on the head node, or a Redis URL: redis://host:port/db, "
        "rediss://host:port/db (TLS) or unix:///path/to/redis.sock")
