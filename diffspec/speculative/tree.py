"""Draft trees for speculative decoding of an autoregressive target (D²SD, tree spec decoding).

Pure tensor/list logic, no model: D²SD's rejection-boundary posterior over
where the target will first reject a draft, the top-K boundaries it
re-anchors, the token trie that merges the branches grown from them, the tree
attention mask that verifies every branch in one target forward, and the
acceptance walk over the target's (greedy or sampled) next tokens.

Conventions: a draft block is d_1..d_n with confidences c_1..c_n (the
drafter's probability of each drafted token; n = γ − 1 for a window of γ,
fewer at the end of the budget or after an EOS). Rejection boundary i
(0 <= i < n) means "the target accepts d_1..d_i and rejects d_{i+1}"; the
K re-anchored prefixes are d_1..d_i for the K most likely boundaries.
"Accepts all n" is not a boundary: the full first draft is extended anyway,
so a K slot spent on it would be a wasted branch.
The tree's node 0 is the *anchor*, the last verified token, whose K/V is not
yet in the target's cache; every other node is one drafted token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


def rejection_posterior(conf: Tensor) -> Tensor:
    """P(the first rejection is at boundary i), i = 0..n−1 (D²SD Eq. 5).

    conf (..., n) -> (..., n): r(0) = 1 − c_1, r(i) = ∏_{k≤i} c_k · (1 − c_{i+1}),
    treating each c_k as an independent acceptance probability. The entries
    sum to 1 − ∏_k c_k: the rest is the all-accepted event, which is not a
    boundary (the D2-SD reference likewise builds its `rates` over the n
    boundaries only and extends the whole first draft separately).
    """
    if conf.shape[-1] < 1:
        raise ValueError("need at least one drafted token")
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidences must be probabilities in [0, 1]")
    ones = torch.ones_like(conf[..., :1])
    survive = torch.cat([ones, torch.cumprod(conf[..., :-1], dim=-1)], dim=-1)  # ∏_{k≤i} c_k, i = 0..n−1
    return survive * (1 - conf)


def top_prefix_lengths(posterior: Tensor, k: int) -> list[list[int]]:
    """The k most likely rejection boundaries (= accepted-prefix lengths) per row, most likely first.

    posterior (..., n) from `rejection_posterior`, so every index is a true
    boundary 0..n−1, never "all accepted". Ties go to the shorter prefix (a
    stable sort), the cheaper and more conservative re-anchor. k > n is
    clipped to n: there are only n boundaries, and each is returned once.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (rejection boundaries to re-anchor) must be an int >= 1, got {k!r}")
    k = min(k, posterior.shape[-1])
    order = posterior.argsort(dim=-1, descending=True, stable=True)
    return order[..., :k].tolist()


@dataclass
class DraftTree:
    """A trie of drafted token sequences below one anchor, flattened in insertion order.

    tokens[n], parent[n] (−1 for the anchor), depth[n] (0 for the anchor);
    branch_nodes[b] lists the nodes of branch b (anchor excluded) in order.
    Children are always added after their parent, so node order is a valid
    topological order and a path's node indices increase.
    """

    tokens: list[int]
    parent: list[int]
    depth: list[int]
    branch_nodes: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_branches(cls, anchor: int, branches: list[list[int]]) -> "DraftTree":
        """Merge branches (token lists continuing the anchor) into one trie: shared
        prefixes become shared nodes, so the target scores each distinct prefix once."""
        tree = cls([anchor], [-1], [0])
        children: dict[tuple[int, int], int] = {}
        for branch in branches:
            node, nodes = 0, []
            for tok in branch:
                key = (node, int(tok))
                if key not in children:
                    children[key] = len(tree.tokens)
                    tree.tokens.append(int(tok))
                    tree.parent.append(node)
                    tree.depth.append(tree.depth[node] + 1)
                node = children[key]
                nodes.append(node)
            tree.branch_nodes.append(nodes)
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

    def walk(self, next_token: Callable[[int], int]) -> tuple[list[int], int]:
        """From the anchor, ask the target for its next token at the current node and
        follow the child carrying it, as long as one does.

        next_token(n) is the target's token after node n: its argmax (greedy),
        or a draw from its distribution p_n. It is asked only along the walk,
        once per node, so a sampled walk spends one draw per emitted token.

        Sampled, this *is* recursive rejection sampling (SpecInfer) for drafts
        that are deterministic: each child token c was proposed with q = one-hot(c),
        so it is accepted with probability min(1, p(c)/1) = p(c), and a rejection
        sets p ← norm(max(p − one-hot(c), 0)), i.e. removes c and renormalizes;
        trying the children in turn and, if all fail, drawing from what is left
        gives "child c with probability p(c), else token x with probability p(x)":
        one draw x ~ p_n. Every emitted token is therefore drawn from the target's
        own conditional at its prefix, whatever the tree's shape or how it was
        chosen. Returns (accepted node indices, anchor excluded; the token after
        the last of them: the correction or bonus).
        """
        child_of = self._child_of()
        path, node = [], 0
        token = next_token(node)
        while (node, token) in child_of:
            node = child_of[(node, token)]
            path.append(node)
            token = next_token(node)
        return path, token

    def accept(self, predicted: list[int]) -> tuple[list[int], int]:
        """Greedy acceptance walk over precomputed predictions: `walk` with next_token = predicted[n].

        predicted[n]: the target's argmax after node n. The accepted tokens plus the
        bonus are exactly what greedy decoding of the target would produce.
        """
        return self.walk(predicted.__getitem__)

    def branch_of(self, path: list[int]) -> int | None:
        """The first branch (in `from_branches` order) whose nodes start with `path`;
        None for an empty path (nothing accepted), which every branch would contain."""
        if not path:
            return None
        return next((b for b, nodes in enumerate(self.branch_nodes) if nodes[:len(path)] == path), None)

    def _child_of(self) -> dict[tuple[int, int], int]:
        return {(p, t): n for n, (p, t) in enumerate(zip(self.parent, self.tokens)) if p >= 0}
