"""The router's side of stored Responses: each new response's id, and GET and DELETE
answered from the store every router and model replica shares (rayllm_app.conversations).

The model replicas write a stored response to the store before its client has it, and load
it into vLLM when a continuation names it (rayllm_app.replica.responses_state); the router
only reads and deletes. Responses the store does not hold (``background: true`` ones, which
live in the replica that runs them) are still asked of the model that holds them.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any

from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.conversations import StoredResponse, open_response_store, visible
from rayllm_app.errors import ModelUnavailableError, ResponseNotFoundError
from rayllm_app.replica.responses_state import OWNER_HEADER
from rayllm_app.router.affinity import new_response_id

logger = logging.getLogger(__name__)

RESPONSE_IDS_KEPT = 100_000  # response id -> model, for the responses the store does not hold


def with_response_id(raw: bytes, data: dict[str, Any]) -> tuple[bytes, str]:
    """A /v1/responses body and its response id: the client's ``request_id``, or one we add
    (spliced into the bytes), so the router knows which model holds the stored response."""
    given = data.get("request_id")
    if isinstance(given, str) and given:
        return raw, given
    response_id = new_response_id(data.get("previous_response_id"))  # the chain's root, for session routing
    start = raw.index(b"{") + 1  # the body is a JSON object with at least "model"
    return raw[:start] + b'"request_id":' + json.dumps(response_id).encode() + b"," + raw[start:], response_id


def owner_header(owner: str | None) -> tuple[tuple[str, str], ...]:
    """The forwarded header that tells the replica whose response it stores or continues."""
    return ((OWNER_HEADER, owner),) if owner is not None else ()


class StoredResponses:
    def __init__(self, settings: RouterSettings) -> None:
        self.store = open_response_store(**settings.responses_store_args())
        self.models: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: str, model: str) -> None:
        """Which model answers this response (for a background one, only that model holds it)."""
        self.models[response_id] = model
        self.models.move_to_end(response_id)
        while len(self.models) > RESPONSE_IDS_KEPT:
            self.models.popitem(last=False)

    async def find(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The stored response, if the store holds it for this caller; None if it does not hold
        it, or cannot be reached (the caller then asks the models, as without a store)."""
        try:
            item = await self.store.get(response_id)
        except Exception as error:  # noqa: BLE001
            logger.warning("Responses store unreachable; asking the models for %s: %r", response_id, error)
            return None
        if item is not None and not item.visible_to(owner):
            raise ResponseNotFoundError(response_id)  # another key's: as if it did not exist
        return item

    async def delete(self, response_id: str, owner: str | None) -> dict[str, Any]:
        """Delete a stored response (OpenAI's answer shape); 404 if there is none for this caller."""
        try:
            item = await self.store.get(response_id)
            if item is None or not visible(item.owner, owner) or not await self.store.delete(response_id):
                raise ResponseNotFoundError(response_id)
        except ResponseNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001
            raise ModelUnavailableError(
                f"The responses store cannot be reached ({error!r}); nothing was deleted. Retry shortly.",
                retry_after_s=5) from None
        self.models.pop(response_id, None)
        return {"id": response_id, "object": "response", "deleted": True}

    async def close(self) -> None:
        await self.store.close()
