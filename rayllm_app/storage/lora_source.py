"""Where LoRA adapters come from: the adapters a model file names or its dynamic path lists,
and each adapter's folder on this node (a local folder as it is; an S3 prefix through the S3
mirror, downloaded once per node, checked and resumable).

The router lists adapters here without loading any (``/v1/models``); a replica fetches one
here before loading it into its engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rayllm_app.config import ModelConfig
from rayllm_app.config.lora_config import LoraConfig, is_s3
from rayllm_app.config.s3_config import S3MirrorConfig

ADAPTER_CONFIG = "adapter_config.json"


class AdapterMismatchError(ValueError):
    """The adapter does not fit the base model or the engine's LoRA limits (the user's 400)."""


def list_adapters(config: ModelConfig) -> dict[str, str]:
    """Every adapter of the model: name -> source. Named adapters first; the dynamic path's
    subfolders that hold an adapter_config.json add the rest."""
    lora = config.lora_config
    if lora is None:
        return {}
    listed: dict[str, str] = {}
    path = lora.dynamic_lora_loading_path
    if path is not None:
        listed = _list_s3(lora, path, config) if is_s3(path) else _list_local(Path(path).expanduser())
    return {**listed, **lora.named()}


def _list_local(root: Path) -> dict[str, str]:
    if not root.is_dir():
        return {}
    return {child.name: str(child) for child in sorted(root.iterdir()) if (child / ADAPTER_CONFIG).is_file()}


def _s3_config(lora: LoraConfig, source: str, config: ModelConfig) -> S3MirrorConfig:
    return lora.s3_config(source, config.engine_config.s3_mirror_config)


def _list_s3(lora: LoraConfig, path: str, config: ModelConfig) -> dict[str, str]:
    from rayllm_app.storage.s3_transfer import S3Client

    s3_config = _s3_config(lora, path, config)
    client = S3Client(s3_config, pool_size=2)
    prefix = s3_config.prefix
    found: dict[str, str] = {}
    token: str | None = None
    while True:
        page: dict[str, Any] = client.call(f"listing {path}", "list_objects_v2", Bucket=s3_config.bucket,
                                           Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        for item in page.get("Contents", []):
            parts = item["Key"][len(prefix):].split("/")
            if len(parts) == 2 and parts[1] == ADAPTER_CONFIG and parts[0]:
                found[parts[0]] = f"{path}{parts[0]}/"
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return dict(sorted(found.items()))


def fetch_adapter(config: ModelConfig, name: str, source: str) -> Path:
    """The adapter's folder on this node: downloaded once per node from S3 (the mirror's lock
    makes concurrent callers wait for one download), or the local folder as it is.

    FileNotFoundError when there is no adapter there; the mirror's S3MirrorError when S3 fails.
    The folder stays as long as the cache does: vLLM reloads an adapter from it after evicting
    it from its own cache, and a folder gone by then would kill the engine.
    """
    if is_s3(source):
        from rayllm_app.storage.s3_mirror import ADAPTER_MARKER, mirror_model

        assert config.lora_config is not None
        folder = mirror_model(_s3_config(config.lora_config, source, config), f"lora/{config.model_id}/{name}",
                              marker=ADAPTER_MARKER)
    else:
        folder = Path(source).expanduser().resolve()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {source}")
    return folder


def check_adapter(folder: Path, lora: LoraConfig) -> dict[str, Any]:
    """The adapter's PEFT config, checked against what the engine was started for; the base's
    modules are checked by vLLM when it loads the weights."""
    try:
        peft = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise AdapterMismatchError(f"its {ADAPTER_CONFIG} cannot be read: {error}") from None
    rank = peft.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterMismatchError(f"its {ADAPTER_CONFIG} has no valid rank 'r' (got {rank!r})")
    if rank > lora.max_lora_rank:
        raise AdapterMismatchError(f"its rank {rank} is above the model's lora_config.max_lora_rank "
                                   f"{lora.max_lora_rank}; raise max_lora_rank to at least {rank}")
    return peft
