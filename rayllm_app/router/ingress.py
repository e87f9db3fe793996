"""The router: a FastAPI ingress that serves the OpenAI API and dispatches by ``model``.

It checks keys and limits, answers ``/v1/models`` from the configs (never waking a
model), and forwards every other API request (method, path, the headers that matter,
the body bytes) to the deployment of the model the body names. The model's replica
answers it with vLLM's own OpenAI application; its bytes pass straight through.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from rayllm_app.config import parse_model_config
from rayllm_app.config.key_config import PRIORITY_VALUES
from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.config.routing_config import AFFINITY_POLICIES
from rayllm_app.errors import (
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    OpenAIError,
    RequestTimeoutError,
    ResponseNotFoundError,
)
from rayllm_app.observability import hop_trace
from rayllm_app.observability.metrics import collect_prometheus_text, record_migration
from rayllm_app.replica.http_forward import (
    FORWARDED_HEADERS,
    ForwardedRequest,
    Reply,
    Usage,
)
from rayllm_app.replica.sleep_registry import sleep_command
from rayllm_app.replica.stream_channel import RouterChannels
from rayllm_app.router.adapters import AdapterCatalog, AdapterRoute
from rayllm_app.router.affinity import affinity_keys
from rayllm_app.router.auth import ApiKey, KeyStore, PermissionDeniedError
from rayllm_app.router.budgets import PRIORITY_PATHS, Admission, Budgets, with_priority
from rayllm_app.router.http_errors import (
    error_response,
    install_error_handlers,
    install_middleware,
)
from rayllm_app.router.middleware import set_request_model
from rayllm_app.router.migration import Attempts, trackable
from rayllm_app.router.model_calls import ModelCalls, translate_serve_error
from rayllm_app.router.model_status import FAILED, READY, ModelSpec, ModelStatusTracker
from rayllm_app.router.playground import mount_playground
from rayllm_app.router.protocol import (
    ENDPOINT_CAPABILITIES,
    FORWARDED_BODY_SCHEMA,
    ErrorResponse,
    ModelCard,
    ModelList,
    peek_body,
)
from rayllm_app.router.stored_responses import (
    StoredResponses,
    owner_header,
    with_response_id,
)
from rayllm_app.router.streaming import Streams

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 500, 503, 504)
}
FORWARDED_OPENAPI = {"requestBody": {"required": True,
                                     "content": {"application/json": {"schema": FORWARDED_BODY_SCHEMA}}}}

app = FastAPI(
    title="rayllm-app",
    description="OpenAI-compatible multi-model LLM serving on Ray Serve and vLLM.",
    version="0.1.0",
)
mount_playground(app)  # GET / and /playground: compare models side by side in the browser
install_error_handlers(app)  # every error in OpenAI's envelope


def _reply(reply: Reply, extra: dict[str, str]) -> Response:
    return Response(reply.body, status_code=reply.status_code,
                    headers={**reply.headers, **extra} if extra else reply.headers)


def _forwarded_headers(request: Request) -> tuple[tuple[str, str], ...]:
    headers = request.headers
    return tuple((name, headers[name]) for name in FORWARDED_HEADERS if name in headers)


@serve.deployment(
    name="router",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    num_replicas=1,  # rayllm_app.app.router_scaling sets the count, or autoscaling, from args.router
)
@serve.ingress(app)
class Router:
    async def __init__(self, handles: list[DeploymentHandle], cards: list[dict[str, Any]],
                       specs: list[dict[str, Any]], settings: dict[str, Any] | None = None,
                       lora_models: list[dict[str, Any]] | None = None) -> None:
        self.settings = RouterSettings.model_validate(settings or {})
        self.keys = KeyStore.from_settings(self.settings)
        install_middleware(app, self.settings)
        self.cards = [ModelCard.model_validate(card) for card in cards]
        self.handles = {card.id: ModelCalls(handle) for card, handle in zip(self.cards, handles)}
        self.capabilities = {card.id: frozenset(card.metadata.get("capabilities") or ()) for card in self.cards}
        # Base models with lora_config (their model files): which names are their adapters.
        self.adapters = AdapterCatalog([parse_model_config(config, f"model '{config['engine_config']['model_id']}'")
                                        for config in lora_models or ()])
        self.stored = StoredResponses(self.settings)
        self.budgets = Budgets(self.settings)
        context = serve.get_replica_context()
        self.status = ModelStatusTracker(context.app_name, [ModelSpec(**spec) for spec in specs],
                                         router_deployment=context.deployment, routers=self.budgets.headroom.routers,
                                         on_routers=self.budgets.headroom.set_routers)
        self.status.start()
        self.channels = RouterChannels() if self.settings.stream_channel else None
        self.streams = Streams(self.channels, self._through_cold_start)
        await self.budgets.warm_up()  # budgets and the usage history live there
        self.replica_id = context.replica_id.unique_id

    def _caller(self, request: Request) -> ApiKey | None:
        """The caller's key: ``Authorization: Bearer`` (OpenAI) or ``x-api-key`` (Anthropic)."""
        headers = request.headers
        authorization = headers.get("authorization")
        if authorization is None and (api_key := headers.get("x-api-key")):
            authorization = f"Bearer {api_key}"
        return self.keys.authenticate(authorization)

    def _handle(self, model: str, caller: ApiKey | None, adapter: AdapterRoute | None = None) -> ModelCalls:
        """The model's calls; for an adapter, its base model's, routed by adapter (a key that
        may use the base may use its adapters)."""
        if adapter is None or caller is None or not caller.allows(adapter.adapter):
            self.keys.authorize(caller, model)  # before the lookup: a 403 must not reveal existence
        set_request_model(adapter.adapter if adapter is not None else model)
        handle = self.handles.get(model)
        if handle is None:
            raise ModelNotFoundError(model, [m for m in self.handles if caller is None or caller.allows(m)])
        state = self.status.state(model)
        if state.state == FAILED:
            raise ModelUnavailableError(f"Model '{model}' is unavailable: {state.message}", retry_after_s=30)
        return handle.for_adapter(adapter.adapter) if adapter is not None else handle

    async def _through_cold_start(self, model: str, pending: Any) -> Any:
        """Await a handle call; if the model has no running replica, bound the wait for one.

        The call goes out at once (so a scaled-to-zero model scales up); only the wait for
        a replica is bounded, never the generation itself.
        """
        state = self.status.state(model)
        if state.state == READY:
            return await pending
        spec = self.status.specs[model]
        task = asyncio.ensure_future(pending)
        ready = asyncio.ensure_future(state.ready.wait())
        try:
            done, _ = await asyncio.wait({task, ready}, timeout=spec.cold_start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if task in done or ready in done:
            return await task
        task.cancel()
        reason = state.message or "its replica is still starting"
        raise ModelUnavailableError(
            f"Model '{model}' did not become ready within {spec.cold_start_timeout_s:g} s ({reason}). "
            "Retry shortly.", retry_after_s=10)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """Router liveness plus each model's state; never wakes a model."""
        health = self.status.health()
        health["stream_channel"] = self.channels.stats() if self.channels is not None else None
        health["router"] = self.replica_id  # which router replica answered (there may be several)
        health["router_pid"] = os.getpid()
        return JSONResponse(health)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self, request: Request) -> Response:
        """Every node's rayllm_* metrics in Prometheus text (also scrapeable from Ray directly)."""
        if self.settings.protect_metrics:
            self._caller(request)
        return Response(await collect_prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/admin/usage", responses=ERROR_RESPONSES)
    async def usage(self, request: Request, since: float = Query(3600.0, ge=0, allow_inf_nan=False),
                    until: float | None = Query(None, ge=0, allow_inf_nan=False)) -> JSONResponse:
        """Requests and tokens per key name and model over a window, from the shared usage
        history: ``since``/``until`` are unix times, or seconds ago when under 10^9. Needs a
        key with ``admin: true`` (open when authentication is off)."""
        self._admin(request, "GET /admin/usage")
        now = time.time()
        start = now - since if since < 1e9 else since
        end = now if until is None else (now - until if until < 1e9 else until)
        try:
            rows = await self.budgets.usage(start, end)
        except Exception as error:  # noqa: BLE001 - the store is down or slow
            raise ModelUnavailableError(f"The usage history cannot be read right now ({type(error).__name__}).",
                                        retry_after_s=5) from None
        return JSONResponse({"object": "list", "since": start, "until": end,
                             "data": [dataclasses.asdict(row) for row in rows]})

    def _admin(self, request: Request, what: str) -> None:
        """Admin endpoints need a key with ``admin: true`` (open when authentication is off)."""
        caller = self._caller(request)
        if caller is not None and not caller.admin:
            raise PermissionDeniedError(f"{what} needs an API key with 'admin: true' in the keys file.",
                                        code="admin_required")

    @app.post("/admin/models/{model_id:path}/sleep", responses=ERROR_RESPONSES)
    async def sleep_model(self, model_id: str, request: Request) -> JSONResponse:
        """Put every replica of a model with ``idle_sleep`` to sleep now (after their requests)."""
        return await self._sleep_command(request, model_id, "sleep")

    @app.post("/admin/models/{model_id:path}/wake", responses=ERROR_RESPONSES)
    async def wake_model(self, model_id: str, request: Request) -> JSONResponse:
        """Wake every sleeping replica of a model, e.g. ahead of expected traffic."""
        return await self._sleep_command(request, model_id, "wake")

    async def _sleep_command(self, request: Request, model_id: str, action: str) -> JSONResponse:
        self._admin(request, f"POST /admin/models/{{model}}/{action}")
        spec = self.status.specs.get(model_id)
        if spec is None:
            raise ModelNotFoundError(model_id, list(self.handles))
        if not spec.idle_sleep:
            raise InvalidRequestError(f"Model '{model_id}' has no deployment_config.idle_sleep, so it never "
                                      "sleeps; add it to the model's YAML (GPU models only).", param="model")
        states = await sleep_command(spec.deployment, action)
        done = bool(states) and all(state == ("sleeping" if action == "sleep" else "awake")
                                    for state in states.values())
        return JSONResponse({"model": model_id, "action": action, "done": done, "replicas": states},
                            status_code=200 if done else 202)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(self, request: Request) -> ModelList:
        """Every model the caller may use, each base model followed by its LoRA adapters
        (``parent``: the base), listed without loading any."""
        caller = self._caller(request)
        data: list[ModelCard] = []
        for card in self.cards:
            base_allowed = caller is None or caller.allows(card.id)
            if base_allowed:
                data.append(self._card(card))
            data += [self._card(ModelCard.model_validate(adapter)) for adapter in await self._adapter_cards(card)
                     if base_allowed or caller.allows(adapter["id"])]  # type: ignore[union-attr]
        return ModelList(data=data)

    async def _adapter_cards(self, card: ModelCard) -> list[dict[str, Any]]:
        return await self.adapters.cards(card.model_dump()) if card.id in self.adapters.configs else []

    def _card(self, card: ModelCard) -> ModelCard:
        """The card with the model's state now (ready, sleeping, scaled_to_zero, ...); an
        adapter's is its base's."""
        state = self.status.state(card.parent or card.id).shown
        return card.model_copy(update={"metadata": {**card.metadata, "status": state}})

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(self, model_id: str, request: Request) -> ModelCard:
        caller = self._caller(request)
        self.keys.authorize(caller, model_id)
        for card in self.cards:
            if card.id == model_id:
                return self._card(card)
        route = await self.adapters.resolve(model_id) if self.adapters else None
        if route is not None:
            base = next(card for card in self.cards if card.id == route.base)
            for adapter in await self._adapter_cards(base):
                if adapter["id"] == route.adapter:
                    return self._card(ModelCard.model_validate(adapter))
        raise ModelNotFoundError(model_id, [m for m in self.handles if caller is None or caller.allows(m)])

    # Forwarded endpoints: vLLM's OpenAI layer in the model's replica answers them.
    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/v1/completions", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def completions(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/v1/responses", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def responses(self, request: Request) -> Response:
        return await self._forward(request)

    @app.get("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
    async def retrieve_response(self, response_id: str, request: Request) -> Response:
        """From the shared store; a response it does not hold (a background one, still running
        or streamed from ``starting_after``) from the model that holds it."""
        if request.query_params.get("stream", "false").lower() != "true":
            caller = self._caller(request)
            item = await self.stored.find(response_id, caller.name if caller is not None else None)
            if item is not None:
                return Response(item.response, media_type="application/json")
        return await self._forward_stored_response(request, response_id, f"/v1/responses/{response_id}")

    @app.delete("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
    async def delete_response(self, response_id: str, request: Request) -> JSONResponse:
        caller = self._caller(request)
        return JSONResponse(await self.stored.delete(response_id, caller.name if caller is not None else None))

    @app.post("/v1/responses/{response_id}/cancel", responses=ERROR_RESPONSES)
    async def cancel_response(self, response_id: str, request: Request) -> Response:
        return await self._forward_stored_response(request, response_id, f"/v1/responses/{response_id}/cancel")

    @app.post("/v1/messages", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def messages(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/v1/messages/count_tokens", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def count_message_tokens(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/v1/embeddings", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def embeddings(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/v1/score", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def score(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/v1/rerank", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def rerank(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/tokenize", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def tokenize(self, request: Request) -> Response:
        return await self._forward(request)

    @app.post("/detokenize", responses=ERROR_RESPONSES, openapi_extra=FORWARDED_OPENAPI)
    async def detokenize(self, request: Request) -> Response:
        return await self._forward(request)

    def _timeout(self, request: Request) -> float | None:
        """The router's request_timeout_s, lowered per request by an `X-Request-Timeout: <s>` header."""
        limit = self.settings.request_timeout_s
        raw = request.headers.get("x-request-timeout")
        if raw is None:
            return limit
        try:
            asked = float(raw)
        except ValueError:
            asked = -1.0
        if not 0 < asked < 1e6:
            raise InvalidRequestError("X-Request-Timeout must be a positive number of seconds.",
                                      param="X-Request-Timeout")
        return min(asked, limit) if limit else asked

    async def _forward(self, request: Request) -> Response:
        """Route a request by its body's ``model`` to that model's replicas."""
        hop_trace.mark("router.forward")
        caller = self._caller(request)
        timeout = self._timeout(request)
        path = request.scope["route"].path  # without the application's route prefix
        raw = await request.body()
        peek = peek_body(raw)
        model = peek.model
        adapter = await self.adapters.resolve(model) if self.adapters and model not in self.handles else None
        if adapter is not None:
            model = adapter.base
            if peek.model != adapter.adapter:  # an alias: the engine knows the adapter by its id
                raw = json.dumps({**peek.data, "model": adapter.adapter}).encode()
        handle = self._handle(model, caller, adapter)
        self._check_serves(model, path, peek.n)
        spec = self.status.specs[model]
        # Budgets, capacity and usage count an adapter's requests as its base model's.
        admission = await self.budgets.admit(caller, model, path, raw, peek.data, capacity=self._capacity(model),
                                             default_max_tokens=spec.default_max_tokens,
                                             low_slots=self._low_slots(model))
        try:
            if caller is not None and spec.priority_scheduling and path in PRIORITY_PATHS:
                raw = with_priority(raw, PRIORITY_VALUES[caller.priority])
            headers = _forwarded_headers(request)
            response_id = None
            if path == "/v1/responses":
                raw, response_id = with_response_id(raw, peek.data)
                self.stored.remember(response_id, model)
                headers += owner_header(caller.name if caller is not None else None)
            affinity = affinity_keys(spec.routing, path, peek.data, request.headers, response_id) \
                if spec.routing.policy in AFFINITY_POLICIES else ()
            forwarded = ForwardedRequest("POST", path, raw, request.url.query, headers, affinity)
        except BaseException:
            self.budgets.settle(admission, None, 400)
            raise
        track = self.channels is not None and spec.migration_limit > 0 and trackable(path, peek.data)
        return await self._dispatch(forwarded, model, peek.stream, handle, timeout, admission, track)

    def _capacity(self, model: str) -> int | None:
        """This router's share of what the model's running replicas take before Serve queues
        requests (the routers share the model's replicas; each counts only its own requests)."""
        per_replica = self.status.specs[model].max_ongoing_requests
        running = self.status.state(model).running_replicas
        if not (per_replica and running):
            return None
        return max(per_replica * running // self.status.routers, 1)

    def _low_slots(self, model: str) -> int | None:
        """This router's share of the engine batch slots low-priority requests may hold."""
        spec = self.status.specs[model]
        running = self.status.state(model).running_replicas
        per_replica = min(spec.max_num_seqs or spec.max_ongoing_requests or 0, spec.max_ongoing_requests or 1 << 30)
        if not (per_replica and running):
            return None
        return max(int(per_replica * running * self.settings.low_priority_share) // self.status.routers, 1)

    def _check_serves(self, model: str, path: str, n: Any) -> None:
        """A clear 400 for an endpoint the model does not serve, or an ``n`` above its limit."""
        capabilities = self.capabilities[model]
        if ENDPOINT_CAPABILITIES[path] not in capabilities:
            served = sorted(p for p, needed in ENDPOINT_CAPABILITIES.items() if needed in capabilities)
            raise InvalidRequestError(
                f"Model '{model}' does not serve {path}; it serves {', '.join(served) or 'no endpoint'} "
                f"(capabilities: {', '.join(sorted(capabilities))}). Send this request to a model whose "
                "card in GET /v1/models lists the capability it needs.", param="model", code="unsupported_endpoint")
        limit = self.status.specs[model].max_n
        if limit is not None and isinstance(n, int) and not isinstance(n, bool) and n > limit:
            raise InvalidRequestError(f"n must be at most {limit} for model '{model}'.", param="n")

    async def _forward_stored_response(self, request: Request, response_id: str, path: str) -> Response:
        """GET or cancel a stored response: at the model that answered it, where the router
        remembers it; otherwise every running model that serves responses is asked in turn (a
        router restarted, or another router took the request). A model with no running
        replica holds no stored response, so it is not woken for this."""
        caller = self._caller(request)
        timeout = self._timeout(request)
        known = self.stored.models.get(response_id)
        candidates = [known] if known else [
            m for m, caps in self.capabilities.items() if "responses" in caps
            and (caller is None or caller.allows(m)) and self.status.state(m).state == READY]
        forwarded = ForwardedRequest(request.method, path, b"", request.url.query, _forwarded_headers(request)
                                     + owner_header(caller.name if caller is not None else None))
        response: Response | None = None
        for model in candidates:
            response = await self._dispatch(forwarded, model, False, self._handle(model, caller), timeout)
            if response.status_code != 404:
                return response
        return response or error_response(ResponseNotFoundError(response_id), None)

    async def _dispatch(self, forwarded: ForwardedRequest, model: str, stream: bool, handle: ModelCalls,
                        timeout: float | None, admission: Admission | None = None, track: bool = False) -> Response:
        """Call the model and answer the client. A request whose replica fails before the
        client has any of its bytes goes to another replica, and a tracked stream resumes
        there mid-stream (rayllm_app.router.migration), up to the model's migration_limit."""
        def done(usage: Usage | None, status: int) -> None:
            if admission is not None:
                self.budgets.settle(admission, usage, status)

        extra = admission.headers if admission is not None else {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        attempts = Attempts(self.status.specs[model].migration_limit)
        if not stream:
            while True:
                response = handle.unary.remote(forwarded)
                call = self._through_cold_start(model, response)
                try:
                    result = await (asyncio.wait_for(call, max(deadline - loop.time(), 0)) if deadline else call)
                except asyncio.TimeoutError:
                    response.cancel()  # aborts the engine request
                    done(None, 504)
                    return error_response(RequestTimeoutError(timeout or 0), model)
                except asyncio.CancelledError:  # the client went away
                    response.cancel()
                    done(None, 499)
                    raise
                except Exception as error:  # noqa: BLE001 - every failure becomes an OpenAI error
                    failure = translate_serve_error(error, model)
                    if await attempts.allow(failure):
                        record_migration(model, failure.reason, 0)  # type: ignore[attr-defined]
                        continue
                    done(None, failure.status_code)
                    return error_response(failure, model)
                done(result.usage, result.status_code)
                return _reply(result, extra)
        while True:
            try:
                started = await self.streams.start(handle, forwarded, model, timeout, deadline, track)
                break
            except OpenAIError as error:
                if await attempts.allow(error):
                    record_migration(model, error.reason, 0)  # type: ignore[attr-defined]
                    continue
                done(None, error.status_code)
                return error_response(error, model)
            except BaseException:
                done(None, 499)
                raise
        first = started.first
        if not isinstance(first, Reply):
            started.close()
            done(None, 500)
            return error_response(EngineError(f"Model '{model}' answered without a reply head."), model)
        if not (first.is_stream and first.status_code == 200):  # an error, or a whole answer
            started.close()
            done(first.usage, first.status_code)
            return _reply(first, extra)
        return StreamingResponse(self.streams.relay(started, model, deadline, timeout, done, attempts),
                                 headers={**first.headers, **SSE_HEADERS, **extra},
                                 media_type=first.headers.get("content-type"))
