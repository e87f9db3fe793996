"""API keys from the keys file and the environment (rayllm_app.router.auth,
rayllm_app.config.key_config): what loads, and that every mistake names the file and the field."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from rayllm_app.config.key_config import KeyLimits
from rayllm_app.config.router_settings import RouterSettings
from rayllm_app.router.auth import AuthenticationError, KeyStore, parse_env_keys, parse_key_file

FULL = """
keys:
  - key: sk-team-a
    name: team-a
    models: [smollm2, tiny-chat]
    priority: low
    limits:
      requests_per_minute: 600
      tokens_per_minute: 200000
      max_concurrent_requests: 16
    model_limits:
      smollm2: {tokens_per_minute: 50000}
  - key: sk-admin
    name: ops
    admin: true
  - key: sk-unnamed
    priority: high
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def test_full_example_loads(tmp_path: Path):
    team, ops, unnamed = parse_key_file(write(tmp_path, FULL))
    assert team.name == "team-a"
    assert team.digest == hashlib.sha256(b"sk-team-a").digest()   # the key itself is not kept
    assert "sk-team-a" not in repr(team)
    assert team.models == frozenset({"smollm2", "tiny-chat"})
    assert team.allows("tiny-chat") and not team.allows("other")
    assert team.priority == "low"
    assert team.limits == KeyLimits(requests_per_minute=600, tokens_per_minute=200000, max_concurrent_requests=16)
    assert team.limits_for("smollm2") == KeyLimits(tokens_per_minute=50000)
    assert team.limits_for("tiny-chat") is None
    assert team.limited and not team.admin
    assert (ops.name, ops.admin, ops.models, ops.priority, ops.limited) == ("ops", True, None, "normal", False)
    assert ops.allows("anything")
    assert (unnamed.name, unnamed.priority, unnamed.admin) == ("file-2", "high", False)


def test_model_limits_alone_make_a_key_limited(tmp_path: Path):
    (key,) = parse_key_file(write(tmp_path, "keys: [{key: k, model_limits: {m: {requests_per_minute: 1}}}]"))
    assert not key.limits.any
    assert key.limited


@pytest.mark.parametrize("text, field, message", [
    ("keys:\n  - key: a\n    limts: {requests_per_minute: 5}\n", "keys[0].limts", "unknown field"),
    ("keys:\n  - key: a\n    priority: urgent\n", "keys[0].priority", "'high', 'normal' or 'low'"),
    ("keys:\n  - key: a\n  - key: b\n    limits: {requests_per_minute: -1}\n",
     "keys[1].limits.requests_per_minute", "greater than or equal to 1"),
    ("keys:\n  - key: a\n    model_limits: {m: {tokens_per_minute: 0}}\n",
     "keys[0].model_limits.m.tokens_per_minute", "greater than or equal to 1"),
    ("keys:\n  - key: a\n    model_limits: {m: {tpm: 5}}\n", "keys[0].model_limits.m.tpm", "unknown field"),
    ("keys:\n  - {key: a, name: team}\n  - {key: b, name: team}\n", "keys[1].name 'team'", "is used twice"),
    ("keys:\n  - {key: a, name: 'a|b'}\n", "keys[0].name", "pattern"),
    ("keys:\n  - {key: ''}\n", "keys[0].key", "at least 1 character"),
    ("keys:\n  - key: a\n    admin: maybe\n", "keys[0].admin", "valid boolean"),
    ("", "keys", "required field is missing"),
])
def test_invalid_file_names_the_file_and_the_field(tmp_path: Path, text: str, field: str, message: str):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        parse_key_file(path)
    text = str(error.value)
    assert text.startswith(f"{path}: invalid API keys file")
    assert field in text
    assert message in text
    assert "\n  " in text   # one line per problem, under the file's line


def test_every_problem_of_a_file_is_reported(tmp_path: Path):
    path = write(tmp_path, "keys:\n  - key: a\n    priority: urgent\n    limits: {requests_per_minute: 0}\n")
    with pytest.raises(ValueError) as error:
        parse_key_file(path)
    assert "(2 error(s))" in str(error.value)
    assert "keys[0].priority" in str(error.value) and "keys[0].limits.requests_per_minute" in str(error.value)


def test_unreadable_or_malformed_file(tmp_path: Path):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ValueError, match=re.escape(f"{missing}: cannot read API keys: FileNotFoundError")):
        parse_key_file(missing)
    broken = write(tmp_path, "keys: [ {key: a\n")
    with pytest.raises(ValueError, match=re.escape(f"{broken}: cannot read API keys")):
        parse_key_file(broken)
    secret = write(tmp_path, "keys: [ {key: sk-secret-value, limits: 5\n")
    with pytest.raises(ValueError) as error:
        parse_key_file(secret)
    assert "sk-secret-value" not in str(error.value)   # a YAML error may quote the line: never shown


def test_a_default_name_cannot_collide_with_an_explicit_one(tmp_path: Path):
    path = write(tmp_path, "keys:\n  - {key: a}\n  - {key: b, name: file-0}\n")
    try:
        keys = parse_key_file(path)
    except ValueError as error:
        assert "file-0" in str(error)
        return
    assert len({key.name for key in keys}) == 2


# --------------------------------------------------------------------------- environment syntax

def test_env_entries():
    plain, models, options = parse_env_keys(" KEY , KEY2:a|b , KEY3::rpm=5;tpm=100;concurrency=2;priority=low ")
    assert (plain.name, plain.models, plain.priority, plain.limited) == ("env-0", None, "normal", False)
    assert plain.digest == hashlib.sha256(b"KEY").digest()
    assert models.models == frozenset({"a", "b"})
    assert models.digest == hashlib.sha256(b"KEY2").digest()
    assert options.models is None   # an empty models part: every model
    assert options.priority == "low"
    assert options.limits == KeyLimits(requests_per_minute=5, tokens_per_minute=100, max_concurrent_requests=2)
    assert options.digest == hashlib.sha256(b"KEY3").digest()
    assert parse_env_keys("") == [] and parse_env_keys(" , ") == []
    (with_models,) = parse_env_keys("K:m1:priority=high;rpm=1")
    assert (with_models.models, with_models.priority) == (frozenset({"m1"}), "high")
    assert with_models.limits == KeyLimits(requests_per_minute=1)


@pytest.mark.parametrize("option", ["rpm=x", "rpm=0", "rpm=-5", "tpm=", "priority=urgent", "burst=5", "rpm"])
def test_env_bad_option_names_it(option: str):
    with pytest.raises(ValueError) as error:
        parse_env_keys(f"OK,sk-secret::concurrency=1;{option}")
    assert f"bad option '{option}'" in str(error.value)
    assert "API key entry 1 of the environment" in str(error.value)
    assert "sk-secret" not in str(error.value)   # the key itself is never shown


def test_key_store_reads_env_and_file_and_authenticates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_RAYLLM_KEYS", "sk-env::rpm=3")
    settings = RouterSettings(api_keys_env="TEST_RAYLLM_KEYS", api_keys_file=str(write(tmp_path, FULL)))
    store = KeyStore.from_settings(settings)
    assert [key.name for key in store.keys] == ["env-0", "team-a", "ops", "file-2"]
    assert store.authenticate("Bearer sk-admin").admin
    assert store.authenticate("bearer  sk-env ").limits.requests_per_minute == 3
    for header in (None, "", "Bearer ", "Basic sk-admin", "Bearer sk-wrong"):
        with pytest.raises(AuthenticationError):
            store.authenticate(header)
    monkeypatch.delenv("TEST_RAYLLM_KEYS")
    open_store = KeyStore.from_settings(RouterSettings(api_keys_env="TEST_RAYLLM_KEYS"))
    assert not open_store.enabled and open_store.authenticate(None) is None


def test_empty_allow_list_is_refused(tmp_path: Path):
    with pytest.raises(ValueError) as error:
        parse_key_file(write(tmp_path, "keys:\n  - {key: sk-a, name: a, models: []}\n"))
    assert "keys[0].models" in str(error.value) and "omit 'models'" in str(error.value)


def test_names_must_not_clash_across_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_RAYLLM_KEYS", "sk-env")
    path = write(tmp_path, "keys:\n  - {key: sk-file, name: env-0}\n")
    with pytest.raises(ValueError) as error:
        KeyStore.from_settings(RouterSettings(api_keys_env="TEST_RAYLLM_KEYS", api_keys_file=str(path)))
    assert "['env-0']" in str(error.value) and "sk-" not in str(error.value)
