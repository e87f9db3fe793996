"""``lora_config``: the LoRA adapters a model file serves on its base model.

Clients name an adapter ``<base model_id>:<adapter>`` (or an alias the file gives), and the
first request for it loads it on a replica (see rayllm_app.replica.lora_adapters). Where the
adapters come from:

- ``adapters``: named adapters, each a local folder or an ``s3://`` prefix;
- ``dynamic_lora_loading_path``: a local folder or ``s3://`` prefix whose every subfolder
  holding an ``adapter_config.json`` is an adapter, named after the subfolder (Ray Serve
  LLM's field of the same name). Named adapters win over listed ones of the same name.

S3 prefixes are fetched through the project's S3 mirror (parallel, resumable, checked, once
per node), reached with ``s3_mirror_config``'s connection fields, which default to the model's
own ``engine_config.s3_mirror_config``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayllm_app.config.s3_config import S3MirrorConfig, parse_s3_uri

ADAPTER_SEPARATOR = ":"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# vLLM's --max-lora-rank accepts only these.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_id(base: str, adapter: str) -> str:
    """The name clients send as ``model`` for an adapter of ``base``."""
    return f"{base}{ADAPTER_SEPARATOR}{adapter}"


def is_s3(source: str) -> bool:
    return source.startswith("s3://")


def _check_source(value: str) -> str:
    if is_s3(value):
        parse_s3_uri(value, want_object=False)
        return value if value.endswith("/") else value + "/"
    if not value.strip():
        raise ValueError("must be a local folder or an s3:// prefix")
    return value


class LoraAdapter(BaseModel):
    """One named adapter."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The adapter's name: clients send '<base>:<name>'.")
    source: str = Field(description="A local folder or s3:// prefix with adapter_config.json and its weights.")
    aliases: list[str] = Field(default_factory=list, description="Other names clients may send as `model`.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"adapter name {value!r} must be letters, digits, '_', '.' or '-' (no ':' or '/')")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return _check_source(value)


class LoraConfig(BaseModel):
    """LoRA adapters on this base model, loaded on demand and kept per replica (LRU)."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[LoraAdapter] = Field(default_factory=list)
    dynamic_lora_loading_path: str | None = Field(
        None, description="A local folder or s3:// prefix: each subfolder with adapter_config.json is an adapter.")
    max_loras: int = Field(2, ge=1, description="vLLM's max_loras: distinct adapters in one batch.")
    max_lora_rank: int = Field(16, description="vLLM's max_lora_rank: the largest adapter rank served.")
    max_adapters_per_replica: int = Field(
        4, ge=1, description="Adapters a replica keeps loaded; past it the least recently used one is evicted.")
    load_timeout_s: float = Field(120.0, gt=0, description="Download and load of one adapter, per attempt.")
    load_retries: int = Field(2, ge=0, description="More attempts after a failed download or load.")
    load_guard: int = Field(
        8, ge=0, description="Requests the replica holding an adapter may have above the least loaded replica "
                             "before the adapter's next request goes to another replica (which loads it too).")
    list_ttl_s: float = Field(30.0, ge=0, description="How long the router keeps the dynamic path's listing.")
    s3_mirror_config: dict[str, Any] | None = Field(
        None, description="How to reach S3 (endpoint_url, region, anonymous, ...: engine_config.s3_mirror_config's "
                          "fields but bucket_uri); default: the model's own s3_mirror_config.")

    @field_validator("dynamic_lora_loading_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else _check_source(value)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {list(VLLM_LORA_RANKS)} (vLLM's choices), got {value}")
        return value

    @field_validator("s3_mirror_config")
    @classmethod
    def _s3(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            if "bucket_uri" in value:
                raise ValueError("has no bucket_uri: each adapter's source (or dynamic_lora_loading_path) names it")
            S3MirrorConfig(bucket_uri="s3://check/", **value)
        return value

    @model_validator(mode="after")
    def _unique(self) -> LoraConfig:
        if not self.adapters and self.dynamic_lora_loading_path is None:
            raise ValueError("needs adapters, a dynamic_lora_loading_path, or both")
        names: set[str] = set()
        for adapter in self.adapters:
            for name in (adapter.name, *adapter.aliases):
                if name in names:
                    raise ValueError(f"the adapter name or alias {name!r} appears twice")
                names.add(name)
        return self

    def named(self) -> dict[str, str]:
        """Named adapters: name -> source."""
        return {adapter.name: adapter.source for adapter in self.adapters}

    def aliases(self) -> dict[str, str]:
        """alias -> adapter name."""
        return {alias: adapter.name for adapter in self.adapters for alias in adapter.aliases}

    def s3_config(self, source: str, model_s3: S3MirrorConfig | None) -> S3MirrorConfig:
        """How to fetch an s3:// source: this section's connection fields, else the model's."""
        connection = self.s3_mirror_config
        if connection is None:
            connection = model_s3.model_dump(exclude={"bucket_uri", "extra_files"}) if model_s3 is not None else {}
        return S3MirrorConfig(bucket_uri=source, **connection)

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM's LoRA engine arguments. The engine's own adapter cache holds as many as the
        replica keeps, so an adapter we keep is never reloaded from disk behind our back."""
        return {"enable_lora": True, "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank,
                "max_cpu_loras": max(self.max_loras, self.max_adapters_per_replica)}
