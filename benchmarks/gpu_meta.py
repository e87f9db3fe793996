"""What a gpu_compare.py run records beside its numbers: the GPU (nvidia-smi), the served
model's shape, the checkout's commit.

benchmarks/gpu_compare.py (run_meta) puts them together with its arguments into the meta row
of results.jsonl, which the report's header is made from.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def gpu_names() -> str | None:
    """'NVIDIA H200 (143771 MiB) x1', or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    name, _, mem = out[0].partition(",")
    return f"{name.strip()} ({mem.strip()}) x{len(out)}"


def gpu_memory_used() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"
    return "GPU memory used: " + out.replace("\n", "; ")


def model_shape(folder: Path) -> dict[str, Any]:
    """The config.json fields that say what is being served (its speed, not its text)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return {k: cfg[k] for k in keys if k in cfg}


def commit(fallback: str | None) -> str:
    """The checkout's commit (+dirty); the GPU machine's copy has no .git: --commit then."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return fallback or "unknown"
    if sha.returncode != 0:
        return fallback or "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
