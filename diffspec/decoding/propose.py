"""What one masked-diffusion step proposes and which of it the policy commits.

The block decoder (`decoding.diffusion`), PSD and the dKV cache's look-ahead (which predicts the
cells the loop will commit, `decoding.cache`) all call these, so the three agree draw for draw.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DecodeConfig
from .policies import select_factor, select_local, select_threshold, select_topk


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """LLaDA's sampler: argmax(exp(l) / (-log u)^T) in float64 (low precision hurts sampling quality)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = (-torch.log(u.clamp_min(1e-300))) ** temperature
    return logits.exp() / gumbel


def propose(logits: Tensor, cfg: DecodeConfig, generator: torch.Generator | None,
            end_ids: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """Candidate tokens and their confidence (softmax prob of the candidate, or random).

    With `cfg.confidence_eos_eot_inf` the confidence comes from a softmax in which
    the `end_ids` (EOS, <|eot_id|>) are impossible, as in LLaDA's sampler: a cell
    whose candidate ends the answer scores 0, so it is committed after the others.
    """
    x0 = add_gumbel_noise(logits, cfg.temperature, generator).argmax(dim=-1)
    if cfg.remasking == "low_confidence":
        scored = logits
        if cfg.confidence_eos_eot_inf and end_ids:
            scored = logits.index_fill(-1, torch.tensor(list(end_ids), device=logits.device), -torch.inf)
        p = F.softmax(scored.to(torch.float64), dim=-1)
        conf = torch.gather(p, -1, x0[..., None]).squeeze(-1).nan_to_num(0.0)  # NaN: only end ids were finite
    else:
        conf = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    return x0, conf


def select(conf: Tensor, cfg: DecodeConfig, k: int) -> Tensor:
    if cfg.policy == "threshold":
        return select_threshold(conf, cfg.threshold)
    if cfg.policy == "factor":
        return select_factor(conf, cfg.factor)
    if cfg.policy == "local":
        return select_local(conf, cfg.threshold, cfg.local_threshold, cfg.local_radius)
    return select_topk(conf, k)
