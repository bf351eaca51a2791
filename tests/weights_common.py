"""Test helper shared by the causal-target tests (GGUF import, Llama / Qwen2 / Qwen3 parity)."""
from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough (and norm gains far enough from 1, biases far from 0) that bugs show in logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.15 * noise)
    return model
