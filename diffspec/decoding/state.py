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
        min_prompt_len: int = 0,
    ) -> "Canvas":
        """`min_prompt_len` reserves prompt columns (as far as the model's positions allow) so that
        longer prompts can join the canvas later (step-level batching)."""
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
        P = max(P, min(min_prompt_len, max_positions - gen_length))
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

    def block(self, index: int, block_length: int) -> "Block":
        """Block `index` of every row's answer."""
        s = self.block_bounds(index, block_length)[0]
        return Block(torch.full((self.batch_size,), s, device=self.x.device), block_length, s)

    def generated(self) -> Tensor:
        return self.x[:, self.prompt_len :]


class Block:
    """Each row's current block of a canvas: `length` columns from `starts[r]`.

    Rows decode the same block in a plain batch, and then every operation is a
    slice, exactly as before rows could differ. A row that joined a running
    batch later (step-level batching, `decoding.diffusion`) is at an earlier
    block than its companions, so the operations gather and scatter per row.
    """

    def __init__(self, starts: Tensor, length: int, uniform: int | None = None):
        """`uniform`: every row's start, when the caller knows they agree (no device sync to find out)."""
        self.starts, self.length = starts, length
        if uniform is None and len(starts):
            uniform = int(starts[0]) if bool((starts == starts[0]).all()) else None
        self.uniform: int | None = uniform

    @property
    def cols(self) -> Tensor:
        """(B, length) canvas columns of each row's block."""
        return self.starts[:, None] + torch.arange(self.length, device=self.starts.device)

    def _index(self, t: Tensor, shift: int = 0) -> Tensor:
        idx = self.cols - shift
        return idx if t.dim() == 2 else idx[..., None].expand(-1, -1, *t.shape[2:])

    def take(self, t: Tensor, shift: int = 0) -> Tensor:
        """The block's cells of `t` (B, T, ...) as (B, length, ...); `shift` reads columns that many to the left."""
        if self.uniform is not None:
            s = self.uniform - shift
            return t[:, s : s + self.length]
        return t.gather(1, self._index(t, shift))

    def put(self, t: Tensor, values: Tensor, shift: int = 0) -> None:
        """Write `values` (B, length, ...) into the block's cells of `t`, in place."""
        if self.uniform is not None:
            s = self.uniform - shift
            t[:, s : s + self.length] = values
        else:
            t.scatter_(1, self._index(t, shift), values)

    def inside(self, n_cols: int) -> Tensor:
        """Bool (B, n_cols): True on each row's block."""
        cols = torch.arange(n_cols, device=self.starts.device)[None, :]
        return (cols >= self.starts[:, None]) & (cols < self.starts[:, None] + self.length)

    def before(self, n_cols: int) -> Tensor:
        """Bool (B, n_cols): True on the columns left of each row's block."""
        return torch.arange(n_cols, device=self.starts.device)[None, :] < self.starts[:, None]
