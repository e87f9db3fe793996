"""Each request's token usage as the engine counted it, whatever endpoint served it.

The router charges token budgets (rayllm_app.tenancy) with what a request really used.
vLLM's OpenAI layer writes usage into some answers but not others (a stream without
``stream_options.include_usage``, Anthropic and Responses events each in their own shape),
so the replica counts at the one place every endpoint passes: the engine client's
``generate`` and ``encode``. The count goes to the request's :class:`Usage`, found through a
context variable that vLLM's handler tasks inherit from the replica's call.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

from rayllm_app.observability import hop_trace
from rayllm_app.replica.http_forward import Usage
from rayllm_app.replica.resume import STREAM_TOKENS

REQUEST_USAGE: ContextVar[Usage | None] = ContextVar("rayllm_request_usage", default=None)


def _metered_generate(generate: Callable[..., AsyncIterator[Any]],
                      on_submit: Callable[[], None]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(generate)
    async def metered(prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        usage = REQUEST_USAGE.get()
        hop_trace.mark("replica.engine")
        on_submit()
        tokens = STREAM_TOKENS.get()  # a stream the router may resume elsewhere (rayllm_app.replica.resume)
        if tokens is not None:
            prompt, sampling_params = tokens.prepare(prompt, sampling_params)
        outputs = generate(prompt, sampling_params, *args, **kwargs)
        commit = None
        if tokens is not None and tokens.tracking:
            commit = tokens.commit  # after each output's chunks are written: their token ids
            if tokens.resume is not None:
                outputs = tokens.follow(outputs)
        if usage is None:
            async for output in outputs:
                yield output
                if commit is not None:
                    commit(output.outputs[0].token_ids if output.outputs else ())
            return
        # CUMULATIVE outputs repeat every token so far; DELTA and FINAL_ONLY carry new ones.
        cumulative = getattr(getattr(sampling_params, "output_kind", None), "name", "") == "CUMULATIVE"
        lengths: dict[int, int] = {}
        prompt_counted = False
        try:
            async for output in outputs:
                if not prompt_counted and output.prompt_token_ids is not None:
                    hop_trace.mark("replica.first_output")
                    usage.prompt_tokens += len(output.prompt_token_ids)
                    prompt_counted = True
                for completion in output.outputs:
                    if cumulative:
                        lengths[completion.index] = len(completion.token_ids)
                    else:
                        usage.completion_tokens += len(completion.token_ids)
                yield output
                if commit is not None:  # vLLM's layer asks for the next output: this one is written
                    commit(output.outputs[0].token_ids if output.outputs else ())
        finally:
            usage.completion_tokens += sum(lengths.values())
            await outputs.aclose()

    return metered


def _metered_encode(encode: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(encode)
    async def metered(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        usage = REQUEST_USAGE.get()
        outputs = encode(*args, **kwargs)
        try:
            async for output in outputs:
                if usage is not None and output.finished and output.prompt_token_ids is not None:
                    usage.prompt_tokens += len(output.prompt_token_ids)
                yield output
        finally:
            await outputs.aclose()

    return metered


def meter_engine(engine: Any, on_submit: Callable[[], None] = lambda: None) -> None:
    """Count every request's tokens on this engine client (instance attributes shadow the
    class's methods, and vLLM's serving classes look them up on each call); ``on_submit`` is
    told of every generate request (rayllm_app.replica.stall_watch)."""
    engine.generate = _metered_generate(engine.generate, on_submit)
    engine.encode = _metered_encode(engine.encode)
