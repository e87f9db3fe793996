"""API keys: ``Authorization: Bearer <key>``, with an optional per-key model allow-list.

Keys are held only as SHA-256 digests and every candidate is compared (in constant time)
on each request, so neither timing nor logs reveal a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

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

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _entry(key: str, name: str, models: list[str] | None) -> ApiKey:
    return ApiKey(name=name, digest=_digest(key), models=frozenset(models) if models else None)


def parse_env_keys(value: str) -> list[ApiKey]:
    keys = []
    for index, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        key, _, models = item.partition(":")
        keys.append(_entry(key, f"env-{index}", [m for m in models.split("|") if m] or None))
    return keys


def parse_key_file(path: Path) -> list[ApiKey]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read API keys: {type(error).__name__}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected 'keys: [{{key: ..., models: [...]}}]'")
    keys = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise ValueError(f"{path}: keys[{index}].key must be a non-empty string")
        models = entry.get("models")
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            raise ValueError(f"{path}: keys[{index}].models must be a list of model ids")
        keys.append(_entry(entry["key"], str(entry.get("name", f"file-{index}")), models))
    return keys


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> KeyStore:
        keys = parse_env_keys(os.environ.get(settings.api_keys_env, ""))
        if settings.api_keys_file:
            keys += parse_key_file(Path(settings.api_keys_file).expanduser())
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
