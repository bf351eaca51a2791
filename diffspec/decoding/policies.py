"""Unmasking policies: given per-position confidences, which positions to commit.

Every policy sees `conf` (B, T) with -inf wherever committing is not allowed
(outside the current block, already decoded) and returns a bool (B, T)
selection. Rows with no candidates select nothing. Any cache can be paired
with any policy because policies never look at the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: split n_masked evenly, remainder to the first steps."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _topk_mask(conf: Tensor, k: Tensor) -> Tensor:
    """Select the k[b] highest-confidence candidates of each row."""
    order = conf.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return (ranks < k[:, None]) & torch.isfinite(conf)


def select_topk(conf: Tensor, k: int | Tensor) -> Tensor:
    if isinstance(k, int):
        k = torch.full((conf.shape[0],), k, device=conf.device)
    return _topk_mask(conf, k)


def select_threshold(conf: Tensor, threshold: float) -> Tensor:
    """Fast-dLLM: every candidate with confidence >= threshold, and at least the best one."""
    sel = (conf >= threshold) & torch.isfinite(conf)
    return sel | select_topk(conf, 1)


def select_factor(conf: Tensor, factor: float) -> Tensor:
    """Fast-dLLM factor rule: commit the top n while (n+1)·(1 - c_n) < factor, at least one."""
    sorted_conf, _ = conf.sort(dim=-1, descending=True)
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=sorted_conf.dtype)
    ok = ((n + 1) * (1 - sorted_conf) < factor) & torch.isfinite(sorted_conf)
    run = ok.long().cumprod(dim=-1).sum(dim=-1)  # length of the leading run that satisfies the rule
    return select_topk(conf, run.clamp(min=1))


def select_local(conf: Tensor, threshold: float, local_threshold: float, radius: int) -> Tensor:
    """LocalLeap-style: confident anchors (>= threshold) commit, and so do masked
    neighbours within `radius` columns of an anchor at the relaxed `local_threshold`.

    Why: a token next to a confidently decoded one is usually constrained by it
    (the next digit of a number, the `=` after an operand), so its confidence is
    trustworthy at a lower bar; isolated positions keep the strict threshold.
    """
    finite = torch.isfinite(conf)
    anchor = (conf >= threshold) & finite
    near = F.max_pool1d(anchor[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)[:, 0] > 0
    sel = anchor | (near & finite & (conf >= local_threshold))
    return sel | select_topk(conf, 1)
