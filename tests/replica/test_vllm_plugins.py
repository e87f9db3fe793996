"""The vLLM-CPU LoRA fix: tokens without an adapter (index -1) get no LoRA contribution."""

from __future__ import annotations

import torch

from rayllm_app.replica.vllm_plugins import without_base_tokens


def bgmv_shrink(inputs, weights, output, indices, scaling=1.0):
    """vLLM-CPU's torch op as it is: weights[-1] is the last slot, not "no adapter"."""
    output[:] = scaling * torch.einsum("bi, boi -> bo", inputs, weights[indices])


def test_base_tokens_get_nothing_and_adapter_tokens_are_unchanged():
    inputs, weights = torch.ones(3, 4), torch.ones(2, 5, 4)
    indices = torch.tensor([0, -1, 1])
    plain, fixed = torch.zeros(3, 5), torch.zeros(3, 5)
    bgmv_shrink(inputs, weights, plain, indices)
    assert plain[1].abs().sum() > 0  # the bug: the base token got slot 1's weights
    without_base_tokens(bgmv_shrink)(inputs, weights, fixed, indices)
    assert fixed[1].abs().sum() == 0
    assert torch.equal(fixed[[0, 2]], plain[[0, 2]]) and torch.equal(inputs, torch.ones(3, 4))  # inputs untouched


def test_wrapping_twice_wraps_once():
    once = without_base_tokens(bgmv_shrink)
    assert without_base_tokens(once) is once
