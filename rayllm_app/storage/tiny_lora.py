"""Build a small random PEFT LoRA adapter for the tiny Llama, for tests and benchmarks.

PEFT initialises ``lora_B`` to zero, so a freshly made adapter is an exact no-op and
cannot show that a request really went through it. Here both ``lora_A`` and ``lora_B``
are drawn from a generator seeded with ``seed``, scaled so that greedy decoding of the
tiny model visibly changes, and two seeds give two different adapters. The folder is
what ``save_pretrained`` writes (``adapter_config.json`` + ``adapter_model.safetensors``),
the layout vLLM's ``--lora-modules`` and ``/v1/load_lora_adapter`` read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rayllm_app.storage.atomic_folder import staged_folder

# Standard deviation of lora_B; with lora_A ~ N(0, 1/in_features) and alpha / rank = 2 the
# update to q_proj/v_proj is about the size of the base weights, so greedy text changes.
_B_STD = 0.05


def build_tiny_lora(
    base: Path,
    target: Path,
    *,
    seed: int,
    rank: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    alpha: int = 16,
) -> Path:
    """Write a random LoRA adapter for the model at ``base`` to ``target`` (atomically).

    Deterministic for given arguments; an existing ``target`` is replaced.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, target = Path(base), Path(target)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                std = param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * _B_STD)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    with staged_folder(target, prefix=".tiny-lora-") as staging:
        peft_model.save_pretrained(staging, safe_serialization=True)
        # PEFT stores target_modules as a set; sort it so the file is the same every run.
        config_file = staging / "adapter_config.json"
        saved = json.loads(config_file.read_text())
        if isinstance(saved.get("target_modules"), list):
            saved["target_modules"] = sorted(saved["target_modules"])
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return target


if __name__ == "__main__":
    import sys

    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    print(build_tiny_lora(Path(sys.argv[1]), Path(sys.argv[2]), seed=seed))
