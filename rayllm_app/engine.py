"""The engine adapter: the only module that imports vLLM.

It turns the model config into engine arguments, owns the tokenizer, and turns vLLM's
request outputs into small engine-neutral deltas the serving layer renders.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from rayllm_app.config import ModelConfig
from rayllm_app.errors import EngineError, InvalidRequestError, ModelUnavailableError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice since the previous delta."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


def build_engine_kwargs(config: ModelConfig, model_path: str) -> dict[str, Any]:
    """Engine arguments from the model file: engine_kwargs plus the fields it manages."""
    engine = config.engine_config
    kwargs = dict(engine.engine_kwargs)
    kwargs["model"] = model_path
    kwargs["served_model_name"] = [engine.model_id]
    if engine.max_total_tokens is not None:
        kwargs["max_model_len"] = engine.max_total_tokens
    kwargs.setdefault("enable_log_requests", False)
    if config.scaling_config.num_workers > 1:
        # GPUs: vLLM's Ray executor places its workers in the replica's placement group.
        # CPUs: vLLM-CPU rejects Ray ("current platform cpu does not support ray"), so its
        # workers are local processes inside the STRICT_PACK group's node.
        backend = "ray" if config.scaling_config.num_gpus_per_worker else "mp"
        kwargs.setdefault("distributed_executor_backend", backend)
    return kwargs


def _convert_logprobs(output: Any) -> list[TokenLogprob] | None:
    if output.logprobs is None:
        return None
    converted = []
    for token_id, entries in zip(output.token_ids, output.logprobs):
        chosen = entries.get(token_id)
        ranked = sorted(entries.items(), key=lambda item: item[1].rank or 0)
        converted.append(
            TokenLogprob(
                token=(chosen.decoded_token if chosen else None) or "",
                logprob=max(chosen.logprob, -9999.0) if chosen else -9999.0,
                top=[(lp.decoded_token or "", max(lp.logprob, -9999.0)) for _, lp in ranked],
            )
        )
    return converted


def _drop_unread_prometheus_logger(engine: Any) -> None:
    """vLLM always adds its Prometheus stat logger. In a replica nothing serves or scrapes
    that registry (the rayllm_ metrics travel through Ray, see metrics.py), yet it updates
    some 40 series on every engine step: 5-6% of the replica's Python time at concurrency 4."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    manager = getattr(engine, "logger_manager", None)
    loggers = getattr(manager, "stat_loggers", None)
    if isinstance(loggers, list):
        manager.stat_loggers = [item for item in loggers if not isinstance(item, PrometheusStatLogger)]


class VLLMEngine:
    """vLLM's AsyncLLM running in this process (its engine core in a child process)."""

    def __init__(self, engine: Any, model_id: str) -> None:
        self._engine = engine
        self.model_id = model_id
        self.tokenizer = engine.get_tokenizer()
        self.context_length: int = engine.model_config.max_model_len

    @classmethod
    def start(cls, config: ModelConfig, model_path: str) -> VLLMEngine:
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = build_engine_kwargs(config, model_path)
        try:
            args = AsyncEngineArgs(**kwargs)
        except TypeError as error:
            raise ValueError(f"engine_config.engine_kwargs: {error}") from None
        from rayllm_app.metrics import engine_stat_logger_factory

        logger.info("Starting vLLM for %s from %s", config.model_id, model_path)
        # Our stat logger feeds the rayllm_ engine metrics; vLLM keeps its log line, and its
        # Prometheus logger, which nothing reads here, is dropped.
        stat_loggers = [engine_stat_logger_factory(config.model_id)]
        # As an OpenAI server, take `vllm serve`'s batch defaults: AsyncLLM's own default
        # (the engine context) caps every GPU at 128 running sequences and 2,048 batched
        # tokens, where `vllm serve` allows 256 (1,024 and 8,192 on H100-class GPUs).
        engine = AsyncLLM.from_engine_args(
            args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=stat_loggers)
        _drop_unread_prometheus_logger(engine)
        return cls(engine, config.model_id)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def _sampling_params(self, kwargs: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kwargs = dict(kwargs)
        structured = kwargs.pop("structured_outputs", None)
        if structured is not None:
            kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
        try:
            return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
        except (ValueError, TypeError) as error:
            raise InvalidRequestError(str(error)) from None

    async def generate(self, prompt_token_ids: list[int], sampling: dict[str, Any],
                       request_id: str) -> AsyncIterator[list[ChoiceDelta]]:
        """Yield the new output of every choice that advanced, as soon as the engine has it.

        When the consumer is slower than the engine, vLLM merges the waiting deltas, so
        later tokens coalesce without any added delay for the first one.
        """
        from vllm.inputs import TokensPrompt

        params = self._sampling_params(sampling)
        stream = self._engine.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), params, request_id)
        try:
            async for output in stream:
                yield [
                    ChoiceDelta(
                        index=choice.index,
                        text=choice.text,
                        num_tokens=len(choice.token_ids),
                        finish_reason=choice.finish_reason,
                        logprobs=_convert_logprobs(choice) if sampling.get("logprobs") is not None else None,
                    )
                    for choice in output.outputs
                ]
        except ValueError as error:
            raise InvalidRequestError(str(error)) from None
        except Exception as error:
            if _is_engine_dead(error):
                raise ModelUnavailableError(
                    f"The engine of model '{self.model_id}' stopped; the replica is being replaced. Retry shortly."
                ) from error
            if isinstance(error, (InvalidRequestError, EngineError)):
                raise
            cause = error.__cause__ or error
            if isinstance(cause, ValueError):
                raise InvalidRequestError(str(cause)) from None
            raise EngineError(f"The engine failed on this request: {type(cause).__name__}: {cause}") from error

    async def check_health(self) -> None:
        await self._engine.check_health()

    @property
    def errored(self) -> bool:
        return bool(self._engine.errored)

    def num_unfinished_requests(self) -> int:
        return self._engine.get_num_unfinished_requests()

    def child_pids(self) -> list[int]:
        """The engine's own processes (engine core, workers): children of this replica."""
        import psutil

        return [child.pid for child in psutil.Process().children(recursive=True)]

    def shutdown(self) -> None:
        self._engine.shutdown()


def _is_engine_dead(error: BaseException) -> bool:
    return type(error).__name__ == "EngineDeadError"
