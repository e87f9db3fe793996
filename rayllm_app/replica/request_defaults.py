"""The model YAML's generation defaults that vLLM cannot apply on its own.

vLLM applies sampling defaults it knows from ``override_generation_config`` (temperature,
top_p, max_tokens, ...: see ``EngineConfig.vllm_engine_kwargs``). What it has no
server-side option for is applied here, to the request body, before vLLM's application
reads it: ``stopping_sequences`` are added to every request's ``stop``, and the other
``generate_kwargs`` (``stop``, ``seed``, ``min_tokens``, ``ignore_eos``, ...) fill what the
request leaves unset. Models that configure none of these pay nothing: the body passes
through untouched.
"""

from __future__ import annotations

import json
from typing import Any

from rayllm_app.config import GenerationConfig

# The endpoints whose bodies take OpenAI sampling parameters.
SAMPLING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def merged_stop(request_stop: Any, default_stop: list[str] | None, stopping_sequences: list[str]) -> Any:
    """The request's stop sequences (else the default ones), plus the model's stopping_sequences."""
    if isinstance(request_stop, str):
        request_stop = [request_stop]
    if request_stop is not None and not isinstance(request_stop, list):
        return request_stop  # not ours to judge: vLLM answers the type error
    merged: list[Any] = []
    for item in (request_stop if request_stop is not None else default_stop or []) + stopping_sequences:
        if item not in merged:
            merged.append(item)
    return merged


class RequestDefaults:
    """Applies one model's request-side defaults to forwarded bodies."""

    def __init__(self, generation: GenerationConfig) -> None:
        defaults = generation.request_defaults()
        self.default_stop: list[str] | None = defaults.pop("stop", None)
        self.fill = defaults
        self.stopping_sequences = list(generation.stopping_sequences)

    @property
    def active(self) -> bool:
        return bool(self.fill or self.default_stop or self.stopping_sequences)

    def apply(self, path: str, body: bytes) -> bytes:
        """The body with the defaults applied; unchanged when nothing applies or it is not a
        JSON object (vLLM then answers the error itself)."""
        if not self.active or path not in SAMPLING_PATHS:
            return body
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if not isinstance(data, dict):
            return body
        for key, value in self.fill.items():
            if data.get(key) is None:
                data[key] = value
        if self.default_stop or self.stopping_sequences:
            data["stop"] = merged_stop(data.get("stop"), self.default_stop, self.stopping_sequences)
        return json.dumps(data).encode()
