"""Calling a model's deployment: its handles, and what Ray Serve raises turned into OpenAI errors.

The router's side of a Ray Serve call to a model replica: the handle per call kind (built
once), the wait for a call's first item, following a channelled call to its end, and the
OpenAI error for each way a call can fail (back-pressure 429, no replica 503, a replica that
died 503, a failure inside it 500).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any

from ray.serve.handle import DeploymentHandle

from rayllm_app.errors import (
    EngineError,
    ModelUnavailableError,
    OpenAIError,
    OverloadedError,
    ReplicaFailedError,
    RequestTimeoutError,
)
from rayllm_app.replica.stream_channel import ChannelClosed, Subscription

ADAPTER_CALLS_KEPT = 1024  # per model: handles for that many LoRA adapters


class ModelCalls:
    """A model's handle per method, built once: ``handle.options()`` and method lookups make
    a new handle each time (about 3% of the router's CPU when done per request)."""

    def __init__(self, handle: DeploymentHandle, adapter: str | None = None) -> None:
        if adapter is not None:  # Serve's request router sees it (routing.adapter_affinity), the replica too
            handle = handle.options(multiplexed_model_id=adapter)
        self._handle = handle
        self.unary = handle.forward
        self.streaming = handle.options(stream=True).forward_stream
        self._adapters: OrderedDict[str, ModelCalls] = OrderedDict()

    def for_adapter(self, adapter: str) -> ModelCalls:
        """The calls for one LoRA adapter of this model, built once per adapter (a bounded cache)."""
        calls = self._adapters.get(adapter)
        if calls is None:
            calls = self._adapters[adapter] = ModelCalls(self._handle, adapter)
            if len(self._adapters) > ADAPTER_CALLS_KEPT:
                self._adapters.popitem(last=False)
        else:
            self._adapters.move_to_end(adapter)
        return calls


def translate_serve_error(error: BaseException, model: str) -> OpenAIError:
    """Map what Ray Serve raises while routing or running a request to an OpenAI error."""
    from ray import exceptions as ray_exceptions
    from ray.serve import exceptions as serve_exceptions

    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, serve_exceptions.BackPressureError):
        return OverloadedError(f"Model '{model}' has too many queued requests. Retry after a short wait.")
    if isinstance(error, getattr(serve_exceptions, "DeploymentUnavailableError", ())):
        return ModelUnavailableError(f"Model '{model}' is not available right now: {error}")
    if isinstance(error, (ray_exceptions.RayActorError, ray_exceptions.ActorDiedError, ChannelClosed)):
        return ReplicaFailedError(f"The replica serving model '{model}' stopped while handling this request; "
                                  "retry it.", reason="channel_closed" if isinstance(error, ChannelClosed)
                                  else "replica_died")
    if isinstance(error, ray_exceptions.RayTaskError):
        cause = error.cause if hasattr(error, "cause") else None
        if isinstance(cause, OpenAIError):
            return cause
        return EngineError(f"Model '{model}' failed on this request: {type(cause or error).__name__}: {cause}")
    return EngineError(f"Model '{model}' failed on this request: {type(error).__name__}: {error}")


def sse_error(error: OpenAIError) -> bytes:
    return b"data: " + json.dumps(error.to_dict()).encode() + b"\n\ndata: [DONE]\n\n"


async def first_of(stream: Any, first: Any, model: str, timeout: float | None,
                    limit: float | None = -1.0) -> Any:
    """Await a stream's first item within ``limit`` s (default: ``timeout``); on any failure
    cancel the call and raise the OpenAI error for it."""
    limit = timeout if limit == -1.0 else limit
    try:
        return await (asyncio.wait_for(first, limit) if limit is not None else first)
    except asyncio.TimeoutError:
        stream.cancel()
        raise RequestTimeoutError(timeout or 0) from None
    except asyncio.CancelledError:
        stream.cancel()
        raise
    except StopAsyncIteration:
        raise EngineError(f"Model '{model}' ended the stream without output.") from None
    except Exception as error:  # noqa: BLE001 - every failure becomes an OpenAI error
        stream.cancel()
        raise translate_serve_error(error, model) from None


async def watch_call(stream: Any, sub: Subscription, model: str) -> None:
    """Follow a channelled call to its end: if the replica or the call fails, so does the stream."""
    try:
        async for _ in stream:
            pass
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001
        sub.fail(translate_serve_error(error, model))
        return
    # The call finished; its END frame is on the way. If it never arrives, do not hang.
    asyncio.get_running_loop().call_later(10.0, sub.fail, ChannelClosed("the stream ended without its last frame"))
