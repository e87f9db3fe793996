"""One Ray Serve deployment per model: each replica owns a worker group and a vLLM engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from rayllm_app.config import ModelConfig, parse_model_config
from rayllm_app.config.routing_config import AFFINITY_POLICIES
from rayllm_app.conversations import open_response_store
from rayllm_app.errors import ReplicaFailedError
from rayllm_app.observability import hop_trace
from rayllm_app.observability.metrics import ModelMetrics, status_of
from rayllm_app.replica.engine_guard import start_guard
from rayllm_app.replica.http_forward import END_GRACE_S, ForwardedRequest, Reply, Sink, Usage, answer_finished
from rayllm_app.replica.idle_sleep import IdleSleep
from rayllm_app.replica.lora_adapters import AdapterManager
from rayllm_app.replica.request_defaults import RequestDefaults
from rayllm_app.replica.responses_state import ResponsesState
from rayllm_app.replica.resume import STREAM_TOKENS, ResumeRequest, StreamTokens
from rayllm_app.replica.stream_channel import (
    ChannelRequest,
    ReplicaChannelServer,
    Ticket,
)
from rayllm_app.replica.usage_meter import REQUEST_USAGE
from rayllm_app.routing.served_keys import ServedKeys

logger = logging.getLogger(__name__)


class ModelServer:
    """A replica: fetch the weights, start the engine, answer forwarded HTTP requests with
    vLLM's own OpenAI application."""

    responses: ResponsesState | None = None  # the shared responses store, when the app has one

    idle_sleep: IdleSleep | None = None  # deployment_config.idle_sleep
    adapters: AdapterManager | None = None  # lora_config
    served_keys: ServedKeys | None = None  # an affinity routing policy
    _unhealthy = False  # the last health check failed: new requests are refused

    async def __init__(self, config: dict[str, Any], responses: dict[str, Any] | None = None) -> None:
        self.timings: dict[str, float] = {"constructor_start": time.time()}
        from rayllm_app.replica.engine import VLLMEngine
        from rayllm_app.storage.model_source import resolve_model_path

        self.config = parse_model_config(config, f"model '{config.get('engine_config', {}).get('model_id')}'")
        self.timings["imports_done"] = time.time()
        model_path = await asyncio.to_thread(resolve_model_path, self.config, _current_placement_group())
        self.timings["weights_ready"] = time.time()
        self.engine = await VLLMEngine.start(self.config, model_path)
        self.defaults = RequestDefaults(self.config.engine_config.generation)
        self.metrics = ModelMetrics(self.config.model_id)
        self._guard = start_guard(self.engine.child_pids())  # the engine dies with this replica
        self._channel: asyncio.Future[ReplicaChannelServer] | None = None
        self._pumps: set[asyncio.Task] = set()         # channel streams in flight
        self._failed_pumps: set[asyncio.Task] = set()  # cancelled because the engine stalled
        self.idle_sleep = self._start_idle_sleep()
        # The affinity keys served here, for every router's replica choice (routing.served_keys).
        self.served_keys = ServedKeys() if self.config.deployment_config.routing.policy in AFFINITY_POLICIES else None
        self.responses = ResponsesState(open_response_store(**responses), self.engine, self.config.model_id) \
            if responses is not None else None
        if self.config.lora_config is not None:
            from rayllm_app.observability.metrics import ray_metric

            self.adapters = AdapterManager(self.config, self.engine, metric=ray_metric)
        self.timings["engine_ready"] = time.time()
        logger.info("Replica of %s ready: %s", self.config.model_id, self.timings)

    def _start_idle_sleep(self) -> IdleSleep | None:
        """The sleep controller of a model with deployment_config.idle_sleep, reporting its state
        to the router and following its commands (sleep_registry)."""
        deployment = self.config.deployment_config
        if deployment.idle_sleep is None:
            return None
        from rayllm_app.observability.metrics import ray_metric
        from rayllm_app.replica import sleep_registry

        controller = IdleSleep(self.engine, self.config.model_id, deployment.idle_sleep.after_s,
                               deployment.idle_sleep.level, deployment.cold_start_timeout_s, metric=ray_metric)
        controller.start()
        replica = serve.get_replica_context().replica_id.unique_id
        self._sleep_follower = asyncio.ensure_future(
            sleep_registry.follow(controller, deployment_name(self.config.model_id), replica))
        return controller

    async def forward(self, request: ForwardedRequest) -> Reply:
        """A whole answer (the router did not ask for a stream), with its usage."""
        self._refuse_if_unhealthy()
        reply: Reply | None = None
        usage: Usage | None = None
        body = bytearray()
        # aclosing: a cancelled call (the client went away, a timeout) must close the stream
        # now, which cancels vLLM's handler and aborts the engine request, not when GC runs.
        async with contextlib.aclosing(self._serve(request)) as items:
            async for item in items:
                if isinstance(item, Reply):
                    reply = item
                    body += item.body
                elif isinstance(item, Usage):
                    usage = item
                else:
                    body += item
        assert reply is not None
        return Reply(reply.status_code, bytes(body), reply.headers, usage)

    async def forward_stream(self, request: ForwardedRequest, channel: ChannelRequest | None = None,
                             resume: ResumeRequest | None = None) -> AsyncIterator[Reply | bytes | Usage | Ticket]:
        """The answer as it is produced: its Reply (status, headers, first bytes), then bytes,
        then its Usage.

        Over Ray, every item is yielded. When the router asked for the stream channel, only
        the channel's ticket is yielded, and the bytes go on the channel (see stream_channel):
        the Reply from here, the rest straight from vLLM's application as it writes them.
        A channel stream the router asked to track carries each chunk's token ids, and
        ``resume`` continues a stream that broke on another replica (rayllm_app.replica.resume).
        """
        hop_trace.mark("replica.call")
        self._refuse_if_unhealthy()
        server = await self._channel_server() if channel is not None else None
        if server is None:
            async with contextlib.aclosing(self._serve(request)) as items:
                async for item in items:
                    yield item
            return
        send_frame = functools.partial(server.send, channel)
        last = [b""]

        def send(item: Reply | bytes, tokens: list[int] | None = None) -> None:
            if item.__class__ is bytes:
                last[0] = item  # type: ignore[assignment]
            send_frame(item, tokens)

        tracker = None
        if channel.track or resume is not None:
            engine = self.engine
            tracker = StreamTokens(resume, engine.tokenizer(), lambda: engine.errored)
        # The engine starts on the request now, while the ticket travels back over Ray (the
        # channel holds frames until the router connects): prefill does not wait for it.
        pump = asyncio.ensure_future(_pump(self._serve(request, send, tracker), send, server, channel))
        self._pumps.add(pump)
        try:
            yield server.ticket
            try:
                # Cancelling this call cancels the pump below (which aborts the engine request),
                # unless the answer is whole by then.
                await asyncio.shield(pump)
            except asyncio.CancelledError:
                if pump in self._failed_pumps and not asyncio.current_task().cancelling():
                    raise ReplicaFailedError(f"The engine of model '{self.config.model_id}' stopped or stalled; "
                                             "this replica is being replaced.", reason="stalled") from None
                if answer_finished(last[0]) and pump not in self._failed_pumps:
                    # The answer is whole: its client left at its last event, and Ray Serve
                    # cancelled this call. Only the END frame with its usage is left to send;
                    # without it the router charges the request's reservation, not its tokens.
                    await asyncio.wait([pump], timeout=END_GRACE_S)
                raise
        finally:
            self._pumps.discard(pump)
            self._failed_pumps.discard(pump)
            if not pump.done():
                pump.cancel()
                await asyncio.wait([pump])

    async def _serve(self, request: ForwardedRequest, sink: Sink | None = None,
                     tracker: StreamTokens | None = None) -> AsyncIterator[Reply | bytes | Usage]:
        """vLLM's answer to one request, counted in the replica's request metrics, and last
        the tokens it used (an answer cut short yields none); with a sink, a stream's bytes
        after its Reply go to the sink (see call_asgi), with their token ids when ``tracker``
        follows the stream."""
        if self.defaults.active:
            request = dataclasses.replace(request, body=self.defaults.apply(request.path, request.body))
        if self.served_keys is not None and request.affinity:
            self.served_keys.add(request.affinity)
        timer = self.metrics.start()
        usage = Usage()
        REQUEST_USAGE.set(usage)  # vLLM's handler tasks, started below, inherit it
        STREAM_TOKENS.set(tracker)
        sleeper = self.idle_sleep
        if sleeper is not None:
            try:
                await sleeper.enter()  # wakes a sleeping engine first
            except BaseException as error:
                timer.finish(status_of(error))
                raise
        # The LoRA adapter the router routed this request by (the body names it too).
        adapter = serve.get_multiplexed_model_id() if self.adapters is not None else ""
        if adapter:
            try:
                await self.adapters.acquire(adapter)  # type: ignore[union-attr]
            except BaseException as error:
                timer.finish(status_of(error))
                if sleeper is not None:
                    sleeper.leave()
                raise

        def watch(chunk: bytes) -> None:
            if chunk.startswith(b'data: {"error"'):
                timer.status = 500  # failed after the stream began; the client saw a 200

        def metered(chunk: bytes, tokens: list[int] | None) -> None:
            watch(chunk)
            sink(chunk, tokens)

        wrap = tracker.app if tracker is not None else None
        if self.responses is not None and request.path.startswith("/v1/responses"):
            wrap = self.responses.wrap if request.path == "/v1/responses" else self.responses.wrap_stored
        items = self.engine.handle(request, metered if sink is not None else None, wrap)
        try:
            async for item in items:
                if isinstance(item, Reply):
                    timer.status = item.status_code
                    if tracker is not None and tracker.tracking:
                        item = tracker.reply(item)
                else:
                    watch(item)
                yield item
            yield usage
        except BaseException as error:
            timer.status = status_of(error)
            raise
        finally:
            timer.finish()
            await items.aclose()
            if sleeper is not None:
                sleeper.leave()
            if adapter:
                self.adapters.release(adapter)  # type: ignore[union-attr]
                self.adapters.count(adapter, usage)  # type: ignore[union-attr]

    async def _channel_server(self) -> ReplicaChannelServer | None:
        """Started on first use, on the loop that runs the requests; None if it cannot listen."""
        if self._channel is None:
            self._channel = asyncio.ensure_future(ReplicaChannelServer.start())
        try:
            return await asyncio.shield(self._channel)
        except OSError as error:
            logger.warning("Stream channel unavailable, streaming over Ray: %s", error)
            return None

    def num_unfinished_requests(self) -> int:
        return self.engine.num_unfinished_requests()

    def replica_info(self) -> dict[str, Any]:
        """Where this replica runs and how long its start took (diagnostics, benchmarks)."""
        channel = self._channel.result() if self._channel is not None and self._channel.done() \
            and not self._channel.exception() else None
        return {**replica_placement(), "timings": {**self.timings, "process_start": _process_start_time()},
                "engine_pids": self.engine.child_pids(), "prefix_cache": self.engine.prefix_cache_totals(),
                "stream_channel": channel.describe() if channel is not None else None}

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve asks every few seconds (models with our request router, routing.replica_router):
        the adapters held here and their loads (routing.adapter_affinity), and a filter of the
        affinity keys served here (routing.served_keys)."""
        stats: dict[str, Any] = {}
        if self.adapters is not None:
            stats.update(adapters=self.adapters.held(), adapter_loads=dict(self.adapters.loads))
        if self.served_keys is not None:
            stats["served_keys"] = self.served_keys.filter()
        return stats

    def _refuse_if_unhealthy(self) -> None:
        """Serve routes to a replica until it fails three health checks in a row: until then,
        refuse new requests here, and the router sends them to another replica."""
        if self._unhealthy:
            raise ReplicaFailedError(f"This replica of model '{self.config.model_id}' is unhealthy.",
                                     reason="rejected")

    async def check_health(self) -> None:
        """Ray Serve calls this periodically: a dead or stalled engine makes the replica
        unhealthy. A stalled engine's streams fail at once, so the router resumes them on
        another replica instead of waiting for Serve to replace this one."""
        try:
            await self.engine.check_health()
            self._unhealthy = False
        except BaseException:
            self._unhealthy = True
            if self._pumps:
                logger.error("Failing %d streams of %s: its engine is unhealthy", len(self._pumps), self.config.model_id)
                self._failed_pumps.update(self._pumps)
                for pump in list(self._pumps):
                    pump.cancel()
            raise

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


async def _pump(items: AsyncIterator[Reply | bytes | Usage], send: Callable[[Reply | bytes], None],
                server: ReplicaChannelServer, request: ChannelRequest) -> None:
    usage = None
    async with contextlib.aclosing(items):
        async for item in items:
            if isinstance(item, Usage):
                usage = item
            else:
                send(item)
    server.end(request, usage)


def _current_placement_group() -> Any | None:
    from ray.util import get_current_placement_group

    return get_current_placement_group()


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def replica_placement() -> dict[str, Any]:
    """The replica's process, node, placement group and the accelerators Ray gave it."""
    import os

    import ray

    context = ray.get_runtime_context()
    group = _current_placement_group()
    return {
        "pid": os.getpid(),
        "node_id": context.get_node_id(),
        "placement_group_id": group.id.hex() if group else None,
        "bundle_specs": group.bundle_specs if group else None,
        "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
        "env": {k: v for k, v in os.environ.items() if k.startswith("RAYLLM_")},
    }


def replica_runtime_env(config: ModelConfig, base: dict[str, Any]) -> dict[str, Any]:
    """The model's runtime_env over the actor options' one, plus propagated secrets.

    Env vars reach the replica process and, through it, the engine's child processes.
    """
    import os

    engine = config.engine_config
    env_vars = {**(base.get("env_vars") or {}), **(engine.runtime_env.get("env_vars") or {})}
    for name in engine.propagate_env:
        if name in os.environ:
            env_vars[name] = os.environ[name]
        else:
            logger.warning("Model %s: %s is not set here; not propagated", config.model_id, name)
    merged = {**base, **engine.runtime_env}
    if env_vars:
        merged["env_vars"] = env_vars
    return merged


def deployment_name(model_id: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model_id).strip("-")


def placement_bundles(config: ModelConfig) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Bundles of the replica's worker group, and the replica actor's own options.

    With one worker the engine runs inside the replica process, so the replica's bundle
    and the worker's are one (the replica must see the worker's GPU). With more, the
    replica gets its own bundle and the engine's Ray workers take the others.
    """
    scaling = config.scaling_config
    actor_options = dict(config.deployment_config.ray_actor_options)
    actor_options.setdefault("num_cpus", 1)
    runtime_env = replica_runtime_env(config, actor_options.get("runtime_env") or {})
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    replica_bundle: dict[str, float] = {"CPU": float(actor_options["num_cpus"])}
    if actor_options.get("num_gpus"):
        replica_bundle["GPU"] = float(actor_options["num_gpus"])
    for name, amount in (actor_options.get("resources") or {}).items():
        replica_bundle[name] = float(amount)
    worker = scaling.worker_bundle()
    if scaling.num_workers == 1:
        merged = dict(worker)
        for name, amount in replica_bundle.items():
            merged[name] = merged.get(name, 0.0) + amount
        if worker.get("GPU"):
            actor_options["num_gpus"] = worker["GPU"] + float(actor_options.get("num_gpus") or 0)
        return [merged], actor_options
    return [replica_bundle] + [dict(worker) for _ in range(scaling.num_workers)], actor_options


def build_model_deployment(config: ModelConfig, server_cls: type = ModelServer,
                           responses: dict[str, Any] | None = None) -> Application:
    """The model's deployment; ``responses``: the shared responses store's arguments
    (``open_response_store``), or None to keep stored responses in each replica, as vLLM does."""
    deployment = config.deployment_config
    bundles, actor_options = placement_bundles(config)
    return serve.deployment(server_cls).options(
        name=deployment_name(config.model_id),
        autoscaling_config=deployment.autoscaling_config.to_serve(),
        max_ongoing_requests=deployment.max_ongoing_requests,
        max_queued_requests=deployment.max_queued_requests,
        ray_actor_options=actor_options,
        placement_group_bundles=bundles,
        placement_group_strategy=config.scaling_config.placement_strategy,
        health_check_period_s=deployment.health_check_period_s,
        health_check_timeout_s=deployment.health_check_timeout_s,
        graceful_shutdown_timeout_s=deployment.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=deployment.graceful_shutdown_wait_loop_s,
        max_constructor_retry_count=deployment.max_constructor_retry_count,
        # The router writes one JSON access-log line per request; Serve's own line per
        # replica call would repeat it, at about 0.1 ms of the replica's CPU each.
        logging_config={"enable_access_log": False},
        **_request_router(config),
    ).bind(config.model_dump(mode="json"), responses)


def _request_router(config: ModelConfig) -> dict[str, Any]:
    """Models with LoRA adapters, or an affinity routing policy, get our request router
    (rayllm_app.routing.replica_router); the others keep Serve's default."""
    routing = config.deployment_config.routing
    if config.lora_config is None and routing.policy == "power_of_two":
        return {}
    from rayllm_app.routing.replica_router import request_router_config

    lora = config.lora_config
    return {"request_router_config": request_router_config(
        adapter_load_guard=lora.load_guard if lora is not None else routing.load_guard,
        load_guard=routing.load_guard, index_size=routing.index_size, policy=routing.policy)}
