"""Stored Responses and the conversation each continues, shared by every router and model
replica (``store.open_response_store``): an embedded Ray actor with a file behind it, or Redis."""

from rayllm_app.conversations.store import ResponseStore, StoredResponse, open_response_store, visible

__all__ = ["ResponseStore", "StoredResponse", "open_response_store", "visible"]
