"""Loading model files: YAML files, folders of them and inline mappings, into validated configs.

Every error names the file, the field path and what was expected (:func:`format_validation_error`);
:func:`load_model_entries` collects the problems of every file so one run reports them all, skips
disabled models and rejects duplicate model ids. Settings accepted for RayLLM compatibility that
have no effect here are logged once per section (:func:`log_ignored_settings`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rayllm_app.config.schema import ConfigError, ModelConfig

logger = logging.getLogger(__name__)


def _format_location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"


def format_validation_error(source: str, error: ValidationError, what: str = "model config") -> str:
    lines = [f"{source}: invalid {what} ({error.error_count()} error(s))"]
    for item in error.errors(include_url=False):
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (remove it or check its spelling)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  {_format_location(item['loc'])}: {message}")
    return "\n".join(lines)


def parse_model_config(data: Any, source: str = "<inline>") -> ModelConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with engine_config, got {type(data).__name__}")
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None
    log_ignored_settings(config, source)
    return config


def log_ignored_settings(config: ModelConfig, source: str) -> None:
    """One log line per RayLLM section whose settings have no effect here."""
    engine = config.engine_config
    if engine.type != "VLLMEngine":
        logger.info("%s: engine_config.type %s: served by vLLM", source, engine.type)
    for section, names in engine.ignored_settings().items():
        logger.warning("%s: %s: ignoring %s (no vLLM equivalent)", source, section, ", ".join(names))


def read_model_file(path: str | Path) -> Any:
    """The YAML mapping in a model file, or a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read model config ({error.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    return parse_model_config(read_model_file(path), str(path))


def expand_model_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expand to their *.yaml / *.yml files in name order."""
    result: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            result.extend(sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"}))
        else:
            result.append(path)
    return result


@dataclass(frozen=True)
class ModelEntry:
    """One enabled model: where it came from, its mapping as written, and the validated config."""

    source: str
    data: dict[str, Any]
    config: ModelConfig


def load_model_entries(sources: list[str | Path | dict[str, Any]]) -> list[ModelEntry]:
    """Load files, folders and inline mappings; skip disabled models; reject duplicate ids.

    Every problem in every file is collected, so one run reports them all.
    """
    entries: list[ModelEntry] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for source in sources:
        items = [("<inline>", source)] if isinstance(source, dict) else [
            (str(p), p) for p in expand_model_paths([source])]
        for name, item in items:
            try:
                data = item if isinstance(item, dict) else read_model_file(item)
                config = parse_model_config(data, name)
            except ConfigError as error:
                errors.append(str(error))
                continue
            if not config.enabled:
                logger.info("Skipping %s: enabled is false", name)
                continue
            clash = next((n for n in (config.model_id, *config.adapter_names()) if n in seen), None)
            if clash is not None:
                what = "engine_config.model_id" if clash == config.model_id else "lora_config adapter name or alias"
                errors.append(f"{name}: {what} '{clash}' is also used by {seen[clash]}")
                continue
            for served in (config.model_id, *config.adapter_names()):
                seen[served] = name
            entries.append(ModelEntry(name, data, config))
    if errors:
        raise ConfigError("\n".join(errors))
    return entries


def load_model_configs(sources: list[str | Path | dict[str, Any]]) -> list[ModelConfig]:
    return [entry.config for entry in load_model_entries(sources)]
