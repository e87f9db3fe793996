"""Where a replica finds its weights: the built-in default, an S3 mirror, a folder or a hub id."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rayllm_app.config import BUILTIN_PREFIX, ModelConfig

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"SmolLM2-135M-Instruct"}


def resolve_model_path(config: ModelConfig, placement_group: Any | None = None) -> str:
    """Make the weights present on this node (and the worker group's nodes); return what vLLM loads."""
    engine = config.engine_config
    source = engine.model_source
    if engine.s3_mirror_config is not None:
        from rayllm_app import s3_mirror

        if placement_group is not None:
            return str(s3_mirror.mirror_on_placement_group_nodes(engine.s3_mirror_config, source, placement_group))
        return str(s3_mirror.mirror_model(engine.s3_mirror_config, source))
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model '{name}'; available: {sorted(BUILTIN_MODELS)}")
        from rayllm_app.default_model import prepare_default_model

        return str(prepare_default_model())
    local = Path(source).expanduser()
    if local.exists():
        return str(local.resolve())
    return source  # a Hugging Face id: vLLM downloads it (or reads the HF cache when offline)


def local_context_length(config: ModelConfig) -> int | None:
    """Context length for the model card without starting anything: config first, then config.json."""
    if config.engine_config.context_length:
        return int(config.engine_config.context_length)
    local = Path(config.engine_config.model_source).expanduser() / "config.json"
    try:
        import json

        return int(json.loads(local.read_text())["max_position_embeddings"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
