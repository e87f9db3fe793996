"""Stored Responses on a model replica: written to the shared store before the client has
them, and loaded into vLLM when a continuation names one this replica does not hold.

vLLM's Responses layer keeps ``store: true`` responses (and the chat messages each turn was
rendered from) in dicts of its own process. For every ``POST /v1/responses`` this wraps
vLLM's application (as an ASGI middleware for that one request):

- **Before** it runs, a ``previous_response_id`` this replica's vLLM does not hold is read
  from the shared store (rayllm_app.conversations) and put into vLLM's dicts, so vLLM renders
  the continuation exactly as it would on the replica that answered the first turn.
- **When vLLM has stored the new response** (it does so before it writes the answer, or a
  stream's ``response.completed`` event), it goes to the shared store before those bytes go on
  to the client: a client that continues as soon as it reads the answer finds it on any replica.
- **After**, both leave vLLM's dicts (they live in the store; vLLM's never shrink), unless
  another request in flight here still uses them.

Responses run with ``background: true`` stay where vLLM keeps them (they are retrieved,
streamed and cancelled on this replica while they run). If the store cannot be reached, a
response stays in this replica only, as with plain vLLM, and a warning is logged.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from rayllm_app.conversations import ResponseStore, StoredResponse, visible
from rayllm_app.errors import ResponseNotFoundError

logger = logging.getLogger(__name__)

OWNER_HEADER = "x-rayllm-owner"  # set by the router: the caller's API key name


class ResponsesState:
    def __init__(self, store: ResponseStore, engine: Any, model: str) -> None:
        self.store = store
        self.engine = engine  # rayllm_app.replica.engine.VLLMEngine: vLLM's dicts
        self.model = model
        self._owners: dict[str, str | None] = {}  # responses held for requests in flight, and whose
        self._users: Counter[str] = Counter()

    def wrap(self, app: Any) -> Any:
        """vLLM's application, for one ``POST /v1/responses``, with the shared store around it."""

        async def responses_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            first = await receive()  # the whole body: call_asgi sends it in one message
            data = _json_object(first.get("body", b""))
            owner = _header(scope, OWNER_HEADER)
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return first
                return await receive()

            previous = data.get("previous_response_id")
            try:
                held = await self._acquire(previous, owner) if isinstance(previous, str) and previous else None
            except ResponseNotFoundError as error:
                await _send_error(send, error)
                return
            response_id = data.get("request_id")
            export = isinstance(response_id, str) and data.get("store", True) is not False \
                and not data.get("background")
            exported = False

            async def send_through(message: dict[str, Any]) -> None:
                nonlocal exported
                if not exported and message["type"] == "http.response.body" \
                        and self.engine.holds_response(response_id):
                    exported = await self._export(response_id, data.get("model") or self.model, owner)
                await send(message)

            try:
                await app(scope, replay, send_through if export else send)
            finally:
                if held is not None:
                    self._release(held)
                if exported:
                    self._release(response_id)

        return responses_app

    def wrap_stored(self, app: Any) -> Any:
        """vLLM's application for a request about one stored response (``GET`` or ``cancel``
        of ``/v1/responses/{id}``): the response is loaded for it, so vLLM answers as it would
        where the response was made (e.g. its 400 for cancelling one that is not running)."""

        async def stored_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            parts = scope["path"].split("/")  # "", "v1", "responses", id[, "cancel"]
            response_id = parts[3] if len(parts) > 3 else ""
            try:
                held = await self._acquire(response_id, _header(scope, OWNER_HEADER)) if response_id else None
            except ResponseNotFoundError as error:
                await _send_error(send, error)
                return
            try:
                await app(scope, receive, send)
            finally:
                if held is not None:
                    self._release(held)

        return stored_app

    async def _acquire(self, response_id: str, owner: str | None) -> str | None:
        """Make vLLM hold ``response_id`` for this request; the id to release after it, or None
        when there is nothing to release (vLLM holds it on its own, or nobody does: vLLM's 404)."""
        if response_id in self._owners:
            if not visible(self._owners[response_id], owner):
                raise ResponseNotFoundError(response_id)
            self._users[response_id] += 1
            return response_id
        if self.engine.holds_response(response_id):
            return None  # vLLM's own: a background response, or one the store did not take
        try:
            item = await self.store.get(response_id)
        except Exception as error:  # noqa: BLE001 - vLLM answers 404, as it would alone
            logger.warning("Responses store unreachable; %s not loaded: %r", response_id, error)
            return None
        if item is None:
            return None
        if not item.visible_to(owner):
            raise ResponseNotFoundError(response_id)
        if response_id not in self._owners:  # another request may have loaded it meanwhile
            self.engine.hold_response(response_id, item.response, item.messages)
            self._owners[response_id] = item.owner
        self._users[response_id] += 1
        return response_id

    async def _export(self, response_id: str, model: str, owner: str | None) -> bool:
        """Write a response vLLM just stored to the shared store; True once it is there."""
        stored = self.engine.stored_response(response_id)
        if stored is None:
            return False
        try:
            await self.store.put(StoredResponse(response_id, model, owner, *stored))
        except Exception as error:  # noqa: BLE001 - it stays in this replica, as with vLLM alone
            logger.warning("Responses store unreachable; %s is kept in this replica only: %r", response_id, error)
            return True  # do not try again on every chunk; _release keeps vLLM's copy
        self._owners.setdefault(response_id, owner)
        self._users[response_id] += 1
        return True

    def _release(self, response_id: str) -> None:
        if response_id not in self._users:
            return  # an export the store did not take: vLLM keeps it
        self._users[response_id] -= 1
        if self._users[response_id] <= 0:
            del self._users[response_id]
            self._owners.pop(response_id, None)
            self.engine.drop_response(response_id)


def _json_object(body: bytes) -> dict[str, Any]:
    """The body's fields; {} for anything but a JSON object (vLLM answers that with its 400)."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _header(scope: dict[str, Any], name: str) -> str | None:
    key = name.encode("latin-1")
    for header, value in scope.get("headers") or ():
        if header == key:
            return value.decode("latin-1")
    return None


async def _send_error(send: Any, error: ResponseNotFoundError) -> None:
    body = json.dumps(error.to_dict()).encode()
    await send({"type": "http.response.start", "status": error.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
