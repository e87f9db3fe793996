"""The API keys file: who may call, which models, and each key's budget and priority.

::

    keys:
      - key: sk-team-a            # the secret; held by the router only as a SHA-256 digest
        name: team-a              # what metrics, logs and usage tables show (never the key)
        models: [smollm2]         # optional allow-list
        priority: low             # high | normal | low: vLLM's priority scheduling, and who is shed first
        limits:                   # optional, per key across every router replica
          requests_per_minute: 600
          tokens_per_minute: 200000     # prompt + completion tokens
          max_concurrent_requests: 16
        model_limits:             # optional, tighter budgets on one model
          smollm2: {tokens_per_minute: 50000}
      - key: sk-admin
        name: ops
        admin: true               # may read GET /admin/usage
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Priority = Literal["high", "normal", "low"]
# vLLM schedules lower values first (scheduling_policy: priority); 0 is its default.
PRIORITY_VALUES: dict[str, int] = {"high": -10, "normal": 0, "low": 10}


class KeyLimits(BaseModel):
    """Budgets of one key (or of one key on one model); absent means unlimited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt plus completion tokens; a request reserves its max_tokens "
        "and settles to what it used.")
    max_concurrent_requests: int | None = Field(None, ge=1)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute,
                                           self.max_concurrent_requests))


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1)
    name: str | None = Field(None, min_length=1, pattern=r"^[^\n|]+$")
    models: list[str] | None = None
    priority: Priority = "normal"
    limits: KeyLimits = Field(default_factory=KeyLimits)
    model_limits: dict[str, KeyLimits] = Field(default_factory=dict)
    admin: bool = False

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty list would allow no model; omit 'models' to allow every model")
        return value


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry]

    @model_validator(mode="after")
    def _names_unique(self) -> KeyFile:
        seen: set[str] = set()
        for index, entry in enumerate(self.keys):
            name = entry.name or f"file-{index}"  # what an unnamed key is called
            if name in seen:
                raise ValueError(f"keys[{index}].name '{name}' is used twice (unnamed keys are called "
                                 "file-<index>): budgets and usage are kept by name, so each key needs its own")
            seen.add(name)
        return self


ENV_LIMIT_NAMES = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute",
                   "concurrency": "max_concurrent_requests"}


def parse_env_options(text: str, where: str) -> tuple[KeyLimits, Priority]:
    """``rpm=60;tpm=10000;concurrency=4;priority=low``: the third part of an env key entry."""
    limits: dict[str, int] = {}
    priority = "normal"
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, value = item.partition("=")
        if name == "priority" and value in PRIORITY_VALUES:
            priority = value
        elif name in ENV_LIMIT_NAMES and value.isdigit() and int(value) > 0:
            limits[ENV_LIMIT_NAMES[name]] = int(value)
        else:
            raise ValueError(f"{where}: bad option '{item}'; use rpm=N, tpm=N, concurrency=N or "
                             "priority=high|normal|low, separated by ';'")
    return KeyLimits(**limits), priority  # type: ignore[arg-type]
