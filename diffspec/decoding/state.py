"""The shared decoding state: one canvas of prompt + masked generation slots.

Prompts of different lengths are left-padded so every row's generation starts
at the same column; padding is excluded from attention by `attention_mask`.
Every method (vanilla, caches, speculative) edits this one object.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Canvas:
    x: Tensor  # (B, P + L) token ids
    attention_mask: Tensor  # (B, P + L) bool, False on left padding
    prompt_len: int  # P, padded prompt length
    gen_length: int  # L
    mask_id: int

    @classmethod
    def from_prompts(
        cls,
        prompts: list[list[int]],
        gen_length: int,
        mask_id: int,
        pad_id: int,
        max_positions: int,
        device: torch.device | str = "cpu",
    ) -> "Canvas":
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty after tokenization; give at least one token of text")
            if mask_id in p:
                raise ValueError(f"prompt {i} contains the mask token id {mask_id}; remove it from the prompt")
        P = max(len(p) for p in prompts)
        if P + gen_length > max_positions:
            raise ValueError(
                f"prompt ({P} tokens) + gen_length ({gen_length}) = {P + gen_length} exceeds the model's "
                f"max_sequence_length {max_positions}; shorten the prompt or lower gen_length"
            )
        B = len(prompts)
        x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
        attn = torch.ones((B, P + gen_length), dtype=torch.bool)
        for i, p in enumerate(prompts):
            x[i, : P - len(p)] = pad_id
            attn[i, : P - len(p)] = False
            x[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        return cls(x.to(device), attn.to(device), P, gen_length, mask_id)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def masked(self) -> Tensor:
        return self.x == self.mask_id

    def block_bounds(self, block: int, block_length: int) -> tuple[int, int]:
        s = self.prompt_len + block * block_length
        return s, s + block_length

    def generated(self) -> Tensor:
        return self.x[:, self.prompt_len :]
