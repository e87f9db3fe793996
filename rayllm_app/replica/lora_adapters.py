"""The LoRA adapters a replica holds: loaded on a request's first use, kept in LRU order,
evicted past ``lora_config.max_adapters_per_replica``.

The router sends an adapter's requests with the adapter id (``<base>:<adapter>``) as both the
body's ``model`` and Ray Serve's ``multiplexed_model_id``, and prefers the replica that
reports holding it (rayllm_app.routing.adapter_affinity). Here:

- concurrent first requests for one adapter wait for one load;
- an adapter is fetched once per node (storage.lora_source), checked against the engine's
  limits, then registered with vLLM's OpenAI layer, which loads it into the engine;
- an adapter with requests in flight is never evicted (the limit may be passed for a moment);
- a failure names the adapter and stays with it: the base model and other adapters serve on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayllm_app.config import ModelConfig
from rayllm_app.errors import AdapterNotFoundError, InvalidRequestError, ModelUnavailableError
from rayllm_app.observability.metrics import report_metric
from rayllm_app.replica.http_forward import Usage
from rayllm_app.storage.lora_source import AdapterMismatchError, check_adapter, fetch_adapter, list_adapters

logger = logging.getLogger(__name__)


class AdapterManager:
    def __init__(self, config: ModelConfig, engine: Any, metric: Callable[[str], Any] | None = None,
                 list_fn: Callable[[ModelConfig], dict[str, str]] = list_adapters,
                 fetch_fn: Callable[[ModelConfig, str, str], Path] = fetch_adapter) -> None:
        assert config.lora_config is not None
        self.config = config
        self.lora = config.lora_config
        self.base = config.model_id
        self.engine = engine
        self.loaded: OrderedDict[str, Path] = OrderedDict()  # adapter id -> folder, least recent first
        self.active: Counter[str] = Counter()
        self.loads: Counter[str] = Counter()  # successful loads per adapter, for tests and /health
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._metric = metric
        self._list = list_fn
        self._fetch = fetch_fn

    def held(self) -> list[str]:
        """The adapters loaded here, for the request router's replica choice."""
        return list(self.loaded)

    async def acquire(self, adapter: str) -> None:
        """Make ``adapter`` ready for a request and hold it until :meth:`release`."""
        self.active[adapter] += 1
        try:
            if adapter not in self.loaded:
                loading = self._loading.get(adapter)
                if loading is None:
                    loading = self._loading[adapter] = asyncio.ensure_future(self._load(adapter))
                    loading.add_done_callback(lambda _: self._loading.pop(adapter, None))
                await asyncio.shield(loading)
            self.loaded.move_to_end(adapter)
        except BaseException:
            self.release(adapter)
            raise

    def release(self, adapter: str) -> None:
        self.active[adapter] -= 1
        if self.active[adapter] <= 0:
            del self.active[adapter]

    def count(self, adapter: str, usage: Usage) -> None:
        """A finished request's tokens, per adapter."""
        tags = {"model": self.base, "adapter": adapter}
        self._inc("rayllm_lora_requests_total", 1, tags)
        self._inc("rayllm_lora_prompt_tokens_total", usage.prompt_tokens, tags)
        self._inc("rayllm_lora_generation_tokens_total", usage.completion_tokens, tags)

    # ------------------------------------------------------------------ loading

    async def _load(self, adapter: str) -> None:
        name = adapter[len(self.base) + 1:]
        # A named adapter's source is in the model file; only others need the dynamic path's
        # listing (an S3 request), as does the error that lists every adapter.
        source = self.lora.named().get(name)
        if source is None:
            source = (await self._sources()).get(name)
        if source is None:
            raise await self._not_found(adapter)
        tags = {"model": self.base, "adapter": adapter}
        started = time.perf_counter()
        attempts = self.lora.load_retries + 1
        failure = ""
        for attempt in range(1, attempts + 1):
            try:
                folder = await asyncio.wait_for(asyncio.to_thread(self._fetch, self.config, name, source),
                                                self.lora.load_timeout_s)
                check_adapter(folder, self.lora)
                await asyncio.wait_for(self.engine.load_adapter(adapter, str(folder)), self.lora.load_timeout_s)
                break
            except AdapterMismatchError as error:
                self._inc("rayllm_lora_loads_total", 1, {**tags, "result": "failed"})
                raise InvalidRequestError(f"The LoRA adapter '{adapter}' ({source}) does not fit the base model "
                                          f"'{self.base}': {error}", param="model", code="adapter_mismatch") from None
            except FileNotFoundError:
                self._inc("rayllm_lora_loads_total", 1, {**tags, "result": "failed"})
                raise await self._not_found(adapter) from None
            except asyncio.TimeoutError:
                failure = f"no answer within lora_config.load_timeout_s ({self.lora.load_timeout_s:g} s)"
            except Exception as error:  # noqa: BLE001 - S3, disk or engine: retried, then a 503
                failure = f"{type(error).__name__}: {error}"
            logger.warning("Loading LoRA adapter %s from %s failed (attempt %d of %d): %s",
                           adapter, source, attempt, attempts, failure)
        else:
            self._inc("rayllm_lora_loads_total", 1, {**tags, "result": "failed"})
            raise ModelUnavailableError(
                f"The LoRA adapter '{adapter}' could not be loaded from {source} ({attempts} attempts; last: "
                f"{failure}). The base model and other adapters still serve; retry later.", retry_after_s=10)
        took = time.perf_counter() - started
        self.loaded[adapter] = folder
        self.loads[adapter] += 1
        self._inc("rayllm_lora_loads_total", 1, {**tags, "result": "ok"})
        self._inc("rayllm_lora_load_seconds_total", took, tags)
        self._observe("rayllm_lora_load_seconds", took, tags)
        logger.info("LoRA adapter %s loaded from %s in %.2f s", adapter, source, took)
        await self._evict()

    async def _sources(self) -> dict[str, str]:
        return await asyncio.to_thread(self._list, self.config)

    async def _not_found(self, adapter: str) -> AdapterNotFoundError:
        return AdapterNotFoundError(adapter, self.base, [f"{self.base}:{n}" for n in await self._sources()])

    async def _evict(self) -> None:
        """Unload the least recently used idle adapters past max_adapters_per_replica."""
        while len(self.loaded) > self.lora.max_adapters_per_replica:
            victim = next((a for a in self.loaded if not self.active[a]), None)
            if victim is None:
                return  # all in use: over the limit until one is released and the next load evicts
            del self.loaded[victim]
            try:
                await self.engine.unload_adapter(victim)
            except Exception:  # noqa: BLE001 - the engine's own cache is LRU too
                logger.exception("Unloading LoRA adapter %s failed", victim)
            self._inc("rayllm_lora_evictions_total", 1, {"model": self.base, "adapter": victim})
            logger.info("LoRA adapter %s evicted (least recently used)", victim)

    # ------------------------------------------------------------------ metrics

    def _inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        report_metric(self._metric, name, value, tags)

    def _observe(self, name: str, value: float, tags: dict[str, str]) -> None:
        report_metric(self._metric, name, value, tags, observe=True)
