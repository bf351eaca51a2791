"""DFlash and D²SD at temperature > 0: the output distribution is exactly the target's.

Exact enumeration, not Monte Carlo: on a 3-token vocabulary, every random draw
the decoders make is driven exhaustively by `Exhaustive` (each torch.multinomial
draw branches over its outcomes, each speculative-sampling coin `u · q <= p`
over accept / reject), every branch weighted by its exact probability, and the
resulting distribution over generated sequences is compared with the target's
autoregressive sampling distribution computed from uncached forwards. A
deliberately wrong acceptance rule fails the same comparison.
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from diffspec.models.causal import Qwen3Config, Qwen3Model
from diffspec.models.dflash import DFlashConfig, DFlashDrafter
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN
from diffspec.speculative import d2sd
from diffspec.speculative.ar import probs
from diffspec.speculative.d2sd import D2SDConfig, DFlashSpecConfig, d2sd_generate, dflash_generate
from diffspec.speculative.tree import DraftTree

V = 3  # vocabulary: small enough to enumerate every random outcome
PROMPT = "1021"
T = 1.3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of forwards of 16-wide models: thread hand-offs cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class DigitTokenizer:
    """Token id = digit: the stub tokenizer of the 3-token models."""

    vocab_size = V

    def encode(self, text: str) -> list[int]:
        return [int(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(str, ids))


def randomize(model: torch.nn.Module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else scale * noise)


def tiny_target(eos: int | None = None, vocab: int = V, seed: int = 0) -> Qwen3Model:
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                      eos_token_id=eos)
    m = Qwen3Model(cfg).eval()
    randomize(m, seed, 0.5)
    return m


def tiny_drafter(target: Qwen3Model, block_size: int, seed: int, mask: int = V - 1) -> DFlashDrafter:
    cfg = DFlashConfig.for_target(target, mask, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                                  intermediate_size=32, target_layers=(1, 2), block_size=block_size)
    d = DFlashDrafter(cfg, target).eval()
    randomize(d, seed, 0.6)
    return d


# ---------------------------------------------------------------- exhaustive driving of the random draws


class _Uniform:
    """A symbolic u ~ U[0, 1) for the coin of `rejection_accept`, written `u * q <= p`: the
    comparison branches into True (weight min(1, p/q)) and False (the rest)."""

    def __init__(self, driver: "Exhaustive", scale: float = 1.0):
        self.driver, self.scale = driver, scale

    def __mul__(self, x) -> "_Uniform":
        return _Uniform(self.driver, self.scale * float(x))

    def __le__(self, y) -> bool:
        a = 1.0 if self.scale <= 0 else min(1.0, max(0.0, float(y) / self.scale))
        return self.driver.choose([a, 1.0 - a]) == 0

    __lt__ = __le__  # u is continuous: ties have probability 0


class Exhaustive:
    """Runs a computation once per combination of its random outcomes, with exact weights.

    Depth-first over a script of choices: a run replays the script, takes the
    first nonzero outcome at every new draw and records how many there were;
    the next script advances the last draw that has outcomes left. Weights are
    the draws' probabilities, so the returned distribution sums to 1.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.script: list[int] = []
        self.trace: list[tuple[int, int, float]] = []  # (chosen rank, number of outcomes, probability)
        monkeypatch.setattr(torch, "multinomial", self._multinomial)
        monkeypatch.setattr(torch, "rand", self._rand)

    def choose(self, weights: list[float]) -> int:
        options = [i for i, w in enumerate(weights) if w > 0]
        i = len(self.trace)
        rank = self.script[i] if i < len(self.script) else 0
        self.trace.append((rank, len(options), weights[options[rank]] / sum(weights)))
        return options[rank]

    def _multinomial(self, probs, num_samples, replacement=False, *, generator=None, out=None):
        assert num_samples == 1
        rows = probs.reshape(-1, probs.shape[-1]).double().tolist()
        picks = torch.tensor([self.choose(r) for r in rows], dtype=torch.long, device=probs.device)
        return picks.view(*probs.shape[:-1], 1)

    def _rand(self, *size, generator=None, device=None, dtype=None, **kw):
        assert size in ((), ((),)), "only the scalar coin of rejection_accept is driven"
        return _Uniform(self)

    def distribution(self, run: Callable[[], tuple[int, ...]]) -> dict[tuple[int, ...], float]:
        dist: dict[tuple[int, ...], float] = {}
        self.script = []
        while True:
            self.trace = []
            out = run()
            dist[out] = dist.get(out, 0.0) + math.prod(p for _, _, p in self.trace)
            j = len(self.trace) - 1
            while j >= 0 and self.trace[j][0] + 1 >= self.trace[j][1]:
                j -= 1
            if j < 0:
                return dist
            self.script = [rank for rank, _, _ in self.trace[:j]] + [self.trace[j][0] + 1]


@torch.no_grad()
def target_distribution(target: Qwen3Model, prompt: list[int], n: int, temperature: float,
                        eos: int | None) -> dict[tuple[int, ...], float]:
    """P(generated sequence) under autoregressive sampling of the target (uncached forwards),
    sequences ending at their first EOS when `eos` is given."""
    dist: dict[tuple[int, ...], float] = {}

    def expand(gen: list[int], prob: float) -> None:
        if len(gen) == n or (gen and gen[-1] == eos):
            dist[tuple(gen)] = prob
            return
        p = probs(target(torch.tensor([prompt + gen])).logits[0, -1], temperature).double()
        for x in range(target.config.vocab_size):
            expand(gen + [x], prob * float(p[x]))

    expand([], 1.0)
    return dist


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def enumerate_generate(monkeypatch, generate: Callable[[], object]) -> dict[tuple[int, ...], float]:
    driver = Exhaustive(monkeypatch)
    dist = driver.distribution(lambda: tuple(generate().raw_ids[0]))
    assert sum(dist.values()) == pytest.approx(1.0, abs=1e-9)
    return dist


# ---------------------------------------------------------------- exactness by enumeration


@pytest.mark.parametrize("eos", [None, 1])
def test_dflash_chain_sampling_is_exact(monkeypatch, eos) -> None:
    target = tiny_target(eos)
    drafter = tiny_drafter(target, block_size=3, seed=1)
    n = 4  # the first round drafts two tokens: q rows must line up with p rows
    cfg = DFlashSpecConfig(gen_length=n, gamma=3, temperature=T, stop_at_eos=eos is not None)
    want = target_distribution(target, DigitTokenizer().encode(PROMPT), n, T, eos)
    got = enumerate_generate(monkeypatch, lambda: dflash_generate(target, drafter, DigitTokenizer(), [PROMPT], cfg))
    assert set(got) <= set(want)
    assert total_variation(got, want) < 1e-5


@pytest.mark.parametrize("eos", [None, 1])
def test_d2sd_tree_sampling_is_exact(monkeypatch, eos) -> None:
    target = tiny_target(eos)
    block, vp = tiny_drafter(target, block_size=3, seed=1), tiny_drafter(target, block_size=6, seed=2)
    n = 5  # round 1: two drafts, two anchors (boundaries 0 and 1) and the first draft extended by one token
    cfg = D2SDConfig(gen_length=n, gamma=3, gamma2=6, k=2, temperature=T, stop_at_eos=eos is not None)
    trees: list[list[list[int]]] = []
    from_branches = DraftTree.from_branches.__func__

    def spy(cls, anchor, branches):
        trees.append([list(b) for b in branches])
        return from_branches(cls, anchor, branches)

    monkeypatch.setattr(DraftTree, "from_branches", classmethod(spy))
    want = target_distribution(target, DigitTokenizer().encode(PROMPT), n, T, eos)
    got = enumerate_generate(monkeypatch, lambda: d2sd_generate(target, block, vp, DigitTokenizer(), [PROMPT], cfg))
    assert set(got) <= set(want)
    assert total_variation(got, want) < 1e-5

    def shares_a_prefix(branches: list[list[int]]) -> bool:
        return any(a[:1] == b[:1] and a != b for i, a in enumerate(branches) for b in branches[i + 1:] if a and b)

    assert any(len(b) >= 3 and shares_a_prefix(b) for b in trees), "no tree had branches sharing a prefix"


def always_accept(p, q, drafts, generator):
    """A wrong rule: keep every draft, then a bonus from the target."""
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def first_child_walk(tree: DraftTree, logits, temperature, generator):
    """A wrong rule: always follow a node's first child, then one target draw."""
    path, node = [], 0
    while node in tree.parent:
        node = tree.parent.index(node)
        path.append(node)
    return path, int(torch.multinomial(probs(logits[node], temperature), 1, generator=generator))


def test_a_wrong_rule_fails_the_enumeration(monkeypatch) -> None:
    """The checks above have teeth: the same enumeration catches a rule that is not exact."""
    target = tiny_target()
    block, vp = tiny_drafter(target, block_size=3, seed=1), tiny_drafter(target, block_size=6, seed=2)
    prompt = DigitTokenizer().encode(PROMPT)
    chain = DFlashSpecConfig(gen_length=3, gamma=3, temperature=T, stop_at_eos=False)
    tree = D2SDConfig(gen_length=3, gamma=3, gamma2=6, k=2, temperature=T, stop_at_eos=False)
    want = target_distribution(target, prompt, 3, T, None)
    monkeypatch.setattr(d2sd, "rejection_accept", always_accept)
    got = enumerate_generate(monkeypatch, lambda: dflash_generate(target, block, DigitTokenizer(), [PROMPT], chain))
    assert total_variation(got, want) > 0.05
    monkeypatch.setattr(d2sd, "_sampled_walk", first_child_walk)
    got = enumerate_generate(monkeypatch, lambda: d2sd_generate(target, block, vp, DigitTokenizer(), [PROMPT], tree))
    assert total_variation(got, want) > 0.05


# ---------------------------------------------------------------- seeding, accounting


@pytest.fixture(scope="module")
def models(tokenizer) -> tuple[Qwen3Model, DFlashDrafter, DFlashDrafter]:
    target = tiny_target(tokenizer.token_to_id(EOS_TOKEN), vocab=tokenizer.vocab_size)
    mask = tokenizer.token_to_id(MASK_TOKEN)
    return target, tiny_drafter(target, 4, seed=1, mask=mask), tiny_drafter(target, 8, seed=2, mask=mask)


def test_sampling_is_seeded(models, tokenizer) -> None:
    target, block, vp = models
    prompts = ["Question: 12+7=", "7", "Question: 100-1"]
    cfg = D2SDConfig(gen_length=10, gamma=4, gamma2=8, k=2, temperature=1.0, seed=3, stop_at_eos=False)
    for run in (lambda c: dflash_generate(target, block, tokenizer, prompts, c),
                lambda c: d2sd_generate(target, block, vp, tokenizer, prompts, c)):
        a, b, c = run(cfg), run(cfg), run(cfg.replace(seed=4))
        assert a.raw_ids == b.raw_ids and a.stats == b.stats
        assert a.raw_ids != c.raw_ids
        assert all(len(r) == 10 for r in a.raw_ids)
        assert a.meter.models["target"].nfe == a.stats["rounds"] + len(prompts)
        assert sum(a.stats["wins"].values()) == a.stats["rounds"]


def test_greedy_ignores_the_seed(models, tokenizer) -> None:
    target, block, vp = models
    cfg = D2SDConfig(gen_length=10, gamma=4, gamma2=8, k=2, stop_at_eos=False)
    a = d2sd_generate(target, block, vp, tokenizer, ["7"], cfg)
    assert a.raw_ids == d2sd_generate(target, block, vp, tokenizer, ["7"], cfg.replace(seed=9)).raw_ids
