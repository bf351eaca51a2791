"""Draft trees for speculative decoding of an autoregressive target (D²SD, tree spec decoding).

Pure tensor/list logic, no model: D²SD's rejection-boundary posterior over
where the target will first reject a draft, the top-K prefix lengths it keeps,
the token trie that merges the branches grown from those prefixes, the tree
attention mask that verifies every branch in one target forward, and the
greedy acceptance walk over the target's predictions.

Conventions: a draft block is d_1..d_γ with confidences c_1..c_γ (the
drafter's probability of each drafted token). Prefix length i means "the
target accepts d_1..d_i and rejects d_{i+1}" (i = γ: accepts all).
The tree's node 0 is the *anchor*, the last verified token, whose K/V is not
yet in the target's cache; every other node is one drafted token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rejection_posterior(conf: Tensor) -> Tensor:
    """P(first rejection after exactly i accepted tokens), i = 0..γ.

    conf (..., γ) -> (..., γ + 1): r(0) = 1 − c_1, r(i) = ∏_{k≤i} c_k · (1 − c_{i+1}),
    r(γ) = ∏ c_k. Treating each c_k as an independent acceptance probability,
    the r(i) sum to 1, which the tests check.
    """
    if conf.shape[-1] < 1:
        raise ValueError("need at least one drafted token")
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidences must be probabilities in [0, 1]")
    ones = torch.ones_like(conf[..., :1])
    survive = torch.cat([ones, torch.cumprod(conf, dim=-1)], dim=-1)  # ∏_{k≤i} c_k, i = 0..γ
    reject_next = torch.cat([1 - conf, ones], dim=-1)  # 1 − c_{i+1}; nothing left to reject at i = γ
    return survive * reject_next


def top_prefix_lengths(posterior: Tensor, k: int) -> list[list[int]]:
    """The k most likely prefix lengths per row (ties to the shorter prefix), most likely first."""
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    k = min(k, posterior.shape[-1])
    order = posterior.argsort(dim=-1, descending=True, stable=True)
    return order[..., :k].tolist()


@dataclass
class DraftTree:
    """A trie of drafted token sequences below one anchor, flattened in insertion order.

    tokens[n], parent[n] (−1 for the anchor), depth[n] (0 for the anchor).
    Children are always added after their parent, so node order is a valid
    topological order and a path's node indices increase.
    """

    tokens: list[int]
    parent: list[int]
    depth: list[int]

    @classmethod
    def from_branches(cls, anchor: int, branches: list[list[int]]) -> "DraftTree":
        """Merge branches (token lists continuing the anchor) into one trie: shared
        prefixes become shared nodes, so the target scores each distinct prefix once."""
        tree = cls([anchor], [-1], [0])
        children: dict[tuple[int, int], int] = {}
        for branch in branches:
            node = 0
            for tok in branch:
                key = (node, int(tok))
                if key not in children:
                    children[key] = len(tree.tokens)
                    tree.tokens.append(int(tok))
                    tree.parent.append(node)
                    tree.depth.append(tree.depth[node] + 1)
                node = children[key]
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """Bool (N, N): node q may attend to node k iff k is q or one of its ancestors."""
        n = len(self)
        m = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            k = q
            while k >= 0:
                m[q, k] = True
                k = self.parent[k]
        return m.to(device)

    def attention_mask(self, n_cached: int, device: torch.device | str = "cpu") -> Tensor:
        """Bool (N, n_cached + N): every node sees the whole committed prefix (the
        target's KV cache) plus its own ancestors in the tree, so each branch is causal
        over its own tokens and blind to its siblings."""
        tree = self.ancestors_mask(device)
        return torch.cat([torch.ones(len(self), n_cached, dtype=torch.bool, device=device), tree], dim=1)

    def positions(self, start: int, device: torch.device | str = "cpu") -> Tensor:
        """Absolute position of each node: the anchor sits at `start`, a node at start + depth."""
        return torch.tensor(self.depth, dtype=torch.long, device=device) + start

    def accept(self, predicted: list[int]) -> tuple[list[int], int]:
        """Greedy acceptance walk: from the anchor, follow the child whose token is the
        target's prediction at the current node, as long as one exists.

        predicted[n]: the target's next token after node n. Returns (path of
        accepted node indices, anchor excluded; the bonus token the target
        predicts after the last accepted node). The accepted tokens plus the bonus
        are exactly what greedy decoding of the target would produce.
        """
        child_of: dict[tuple[int, int], int] = {(p, t): n for n, (p, t) in
                                                enumerate(zip(self.parent, self.tokens)) if p >= 0}
        path, node = [], 0
        while (node, predicted[node]) in child_of:
            node = child_of[(node, predicted[node])]
            path.append(node)
        return path, predicted[node]
