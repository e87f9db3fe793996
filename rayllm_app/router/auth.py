"""API keys: ``Authorization: Bearer <key>``, with an optional per-key model allow-list,
budgets and priority (rayllm_app.config.key_config).

Keys are held only as SHA-256 digests and every candidate is compared (in constant time)
on each request, so neither timing nor logs reveal a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from rayllm_app.config.key_config import KeyFile, KeyLimits, Priority, parse_env_options
from rayllm_app.config.loader import format_validation_error
from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.errors import OpenAIError

logger = logging.getLogger(__name__)


class AuthenticationError(OpenAIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(OpenAIError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "model_not_allowed"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    models: frozenset[str] | None  # None: every model
    priority: Priority = "normal"
    limits: KeyLimits = field(default_factory=KeyLimits)
    model_limits: tuple[tuple[str, KeyLimits], ...] = ()
    admin: bool = False

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def limits_for(self, model: str) -> KeyLimits | None:
        for name, limits in self.model_limits:
            if name == model:
                return limits
        return None

    @property
    def limited(self) -> bool:
        return self.limits.any or any(limits.any for _, limits in self.model_limits)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_env_keys(value: str) -> list[ApiKey]:
    """``KEY``, ``KEY:model-a|model-b`` or ``KEY:models:rpm=60;tpm=10000;concurrency=4;priority=low``
    entries, comma-separated (an empty models part allows every model)."""
    keys = []
    for index, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        key, _, rest = item.partition(":")
        models, _, options = rest.partition(":")
        limits, priority = parse_env_options(options, f"API key entry {index} of the environment")
        keys.append(ApiKey(name=f"env-{index}", digest=_digest(key),
                           models=frozenset(m for m in models.split("|") if m) or None,
                           priority=priority, limits=limits))
    return keys


def parse_key_file(path: Path) -> list[ApiKey]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read API keys: {type(error).__name__}") from None
    try:
        parsed = KeyFile.model_validate(data)
    except ValidationError as error:
        raise ValueError(format_validation_error(str(path), error, "API keys file")) from None
    return [ApiKey(name=entry.name or f"file-{index}", digest=_digest(entry.key),
                   models=frozenset(entry.models) if entry.models else None, priority=entry.priority,
                   limits=entry.limits, model_limits=tuple(entry.model_limits.items()), admin=entry.admin)
            for index, entry in enumerate(parsed.keys)]


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> KeyStore:
        keys = parse_env_keys(os.environ.get(settings.api_keys_env, ""))
        if settings.api_keys_file:
            keys += parse_key_file(Path(settings.api_keys_file).expanduser())
        names = [key.name for key in keys]
        if clash := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"API key names {clash} are used by more than one key (environment and "
                             "file together): budgets and usage are kept by name; rename them in the file")
        if keys:
            logger.info("API key authentication on (%d key(s))", len(keys))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key, or None when auth is off; 401 when it is on and the key is wrong."""
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("Missing API key: send the header 'Authorization: Bearer <key>'.")
        digest = _digest(token.strip())
        match = None
        for key in self.keys:  # no early exit: every key is compared
            if hmac.compare_digest(key.digest, digest):
                match = key
        if match is None:
            raise AuthenticationError("Invalid API key.")
        return match

    @staticmethod
    def authorize(key: ApiKey | None, model: str) -> None:
        """403 without saying whether the model exists."""
        if key is not None and not key.allows(model):
            raise PermissionDeniedError(f"This API key is not allowed to use the model '{model}'.",
                                        param="model")
