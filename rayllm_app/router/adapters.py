"""Which ``model`` names are LoRA adapters, and of which base model (lora_config).

A client names an adapter ``<base>:<adapter>`` or by an alias its model file gives. Named
adapters and aliases resolve from the model files alone; a name under a base's
``dynamic_lora_loading_path`` is checked against that path's listing, kept for
``lora_config.list_ttl_s``. Nothing here loads an adapter: the replica that gets the first
request for it does (rayllm_app.replica.lora_adapters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from rayllm_app.config import ModelConfig, adapter_id
from rayllm_app.errors import AdapterNotFoundError
from rayllm_app.storage.lora_source import list_adapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterRoute:
    base: str      # the base model's id: its deployment serves the adapter
    adapter: str   # the adapter id, <base>:<adapter>: the engine knows it by this name


class AdapterCatalog:
    def __init__(self, configs: list[ModelConfig]) -> None:
        self.configs = {config.model_id: config for config in configs if config.lora_config is not None}
        # Every name of a named adapter (its id and its aliases) -> its route.
        self.names: dict[str, AdapterRoute] = {
            name: AdapterRoute(config.model_id, target)
            for config in self.configs.values() for name, target in config.adapter_names().items()}
        self._listed: dict[str, tuple[float, dict[str, str]]] = {}
        self._lock = asyncio.Lock()

    def __bool__(self) -> bool:
        return bool(self.configs)

    async def resolve(self, model: str) -> AdapterRoute | None:
        """The adapter a ``model`` name means; None when it names no adapter (a base model or
        an unknown name); AdapterNotFoundError for an unknown adapter of a known base."""
        route = self.names.get(model)
        if route is not None:
            return route
        base, separator, name = model.rpartition(":")
        if not separator or base not in self.configs:
            return None
        listing = await self.listing(base)
        if name not in listing:
            raise AdapterNotFoundError(model, base, [adapter_id(base, n) for n in listing])
        return AdapterRoute(base, model)

    async def listing(self, base: str) -> dict[str, str]:
        """The base's adapters (name -> source): named ones, plus its dynamic path's, listed at
        most once per list_ttl_s. A listing that fails keeps the last one (or the named ones)."""
        config = self.configs[base]
        assert config.lora_config is not None
        if config.lora_config.dynamic_lora_loading_path is None:
            return config.lora_config.named()
        now = time.monotonic()
        cached = self._listed.get(base)
        if cached is not None and now - cached[0] < config.lora_config.list_ttl_s:
            return cached[1]
        async with self._lock:
            cached = self._listed.get(base)
            if cached is not None and now - cached[0] < config.lora_config.list_ttl_s:
                return cached[1]
            try:
                listing = await asyncio.to_thread(list_adapters, config)
            except Exception as error:  # noqa: BLE001 - S3 down: serve what was known
                logger.warning("Listing the LoRA adapters of %s failed: %s", base, error)
                listing = cached[1] if cached is not None else config.lora_config.named()
            self._listed[base] = (now, listing)
            return listing

    async def cards(self, base_card: dict[str, Any]) -> list[dict[str, Any]]:
        """Model cards of a base's adapters (``parent`` is the base), from its listing."""
        base = base_card["id"]
        config = self.configs.get(base)
        if config is None:
            return []
        assert config.lora_config is not None
        aliases: dict[str, list[str]] = {}
        for alias, name in config.lora_config.aliases().items():
            aliases.setdefault(name, []).append(alias)
        return [{**base_card, "id": adapter_id(base, name), "root": source, "parent": base,
                 "metadata": {**base_card["metadata"], "adapter": True, "aliases": aliases.get(name, [])}}
                for name, source in (await self.listing(base)).items()]
