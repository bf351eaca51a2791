"""DFlash and D²SD speculative decoding: exactness vs. AR greedy, long acceptances with oracle drafters,
KV compaction, cost accounting and errors."""
from __future__ import annotations

import copy

import pytest
import torch

from diffspec.models.causal import CausalKVCache, Qwen3Config, Qwen3Model
from diffspec.models.dflash import DFlashConfig, DFlashDrafter
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN
from diffspec.speculative.ar import ARConfig, SpecConfig, ar_generate
from diffspec.speculative.d2sd import D2SDConfig, DFlashSpecConfig, d2sd_generate, dflash_generate
from diffspec.speculative.tree import DraftTree

TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
PROMPTS = ["Question: 12+7=", "Question: what is 3 * 45?\nAnswer:", "7", "Question: 100-1"]


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.15 * noise)


def make_target(tokenizer, seed: int = 0, **kw) -> Qwen3Model:
    cfg = Qwen3Config(**{**TINY, "vocab_size": tokenizer.vocab_size,
                         "eos_token_id": tokenizer.token_to_id(EOS_TOKEN), **kw})
    m = Qwen3Model(cfg).eval()
    randomize(m, seed)
    return m


def make_drafter(target: Qwen3Model, tokenizer, seed: int = 1, cls: type = DFlashDrafter, **kw) -> DFlashDrafter:
    cfg = DFlashConfig.for_target(target, tokenizer.token_to_id(MASK_TOKEN), **{"target_layers": (1, 3), **kw})
    d = cls(cfg, target).eval()
    randomize(d, seed)
    return d


class Oracle(DFlashDrafter):
    """A drafter that 'knows' the target's greedy continuation: one-hot logits of `greedy[position]`.

    Window offsets in `wrong` get a wrong token with low confidence, so the
    first draft breaks there and D²SD's posterior should re-anchor just before it.
    """

    greedy: list[int] = []
    wrong: tuple[int, ...] = ()

    def forward(self, block_ids, block_positions, ctx_hidden, ctx_positions, ctx_mask=None, ctx_index=None, *,
                ctx_cache=None, read=None, compact=False):  # no draft vocabulary: compact = full logits
        B, W = block_ids.shape
        V = self.config.vocab_size
        pos = block_positions.expand(B, W).reshape(-1).tolist()
        truth = torch.tensor([self.greedy[p] if p < len(self.greedy) else 0 for p in pos]).view(B, W)
        logits = torch.zeros(B, W, V).scatter_(2, truth[..., None], 10.0)
        for j in self.wrong:
            if j < W:
                logits[:, j] = 0.0
                logits[torch.arange(B), j, (truth[:, j] + 1) % V] = 2.0
        return logits if read is None else logits[read]


@pytest.fixture(scope="module")
def target(tokenizer) -> Qwen3Model:
    return make_target(tokenizer)


@pytest.fixture(scope="module")
def drafters(target, tokenizer) -> dict[str, DFlashDrafter]:
    return {"block": make_drafter(target, tokenizer, seed=1, block_size=8),
            "vp": make_drafter(target, tokenizer, seed=2, n_layers=1, target_layers=(2,), block_size=16)}


def greedy_sequence(target, tokenizer, prompt: str, n: int) -> list[int]:
    res = ar_generate(target, tokenizer, [prompt], ARConfig(gen_length=n, stop_at_eos=False))
    return tokenizer.encode(prompt) + res.raw_ids[0]


def oracle_drafters(target, tokenizer, prompt: str, budget: int, gamma: int, gamma2: int) -> tuple[Oracle, Oracle]:
    """A block drafter (window γ) and a VP drafter (window γ₂) that both draft the target's own greedy
    continuation of `prompt`, so every draft is right unless a test marks some wrong."""
    greedy = greedy_sequence(target, tokenizer, prompt, budget + gamma2)
    block = make_drafter(target, tokenizer, cls=Oracle, block_size=gamma)
    vp = make_drafter(target, tokenizer, cls=Oracle, block_size=gamma2)
    block.greedy = vp.greedy = greedy
    return block, vp


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(k=0), "k .* must be >= 1"),
    (dict(gamma=8, gamma2=7), "gamma2"),
    (dict(gamma=1), "gamma must be >= 2"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(gen_length=0), "gen_length"),
    (dict(k="4"), "k must be a int or .auto."),
])
def test_config_validation(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        D2SDConfig(**kw)


def test_config_defaults() -> None:
    c = D2SDConfig()
    assert (c.gamma, c.gamma2, c.k, c.temperature) == (16, 32, 4, 0.0)
    assert c.replace(k=2).to_dict()["k"] == 2
    assert DFlashSpecConfig().gamma == 16
    assert D2SDConfig(temperature=0.7).temperature == 0.7 and DFlashSpecConfig(temperature=1.5).temperature == 1.5
    with pytest.raises(ValueError, match="gamma must be >= 2"):
        DFlashSpecConfig(gamma=1)


# --- KV compaction ------------------------------------------------------------------------------


@torch.no_grad()
def test_cache_keep_equals_sequential_cache(target) -> None:
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(2, 300, (1, 5), generator=g)
    tree = DraftTree.from_branches(11, [[21, 22], [31, 32, 33]])  # nodes: 0 anchor, 1-2 branch 1, 3-5 branch 2
    cache = CausalKVCache.for_model(target, 1, 32)
    target(prefix, kv_cache=cache)
    P = cache.length
    out = target(torch.tensor([tree.tokens]), positions=tree.positions(P), kv_cache=cache,
                 attn_mask_override=tree.attention_mask(P)[None, None])
    committed = torch.cat([prefix, torch.tensor([[11, 31, 32, 33]])], dim=1)
    full = target(committed).logits[0]
    assert torch.allclose(out.logits[0, [0, 3, 4, 5]], full[P:], atol=1e-4)  # tree mask = per-branch causal
    cache.keep(P, [P + 0, P + 3, P + 4, P + 5])
    assert cache.length == P + 4
    nxt = target(torch.tensor([[7, 8]]), kv_cache=cache).logits[0]
    ref = target(torch.cat([committed, torch.tensor([[7, 8]])], dim=1)).logits[0, -2:]
    assert torch.allclose(nxt, ref, atol=1e-4)
    # A chain's accepted path is already in place (nothing moves); a run of slots that starts one
    # later is not, and must move.
    L = cache.length
    target(torch.tensor([[41, 42, 43]]), kv_cache=cache)
    cache.keep(L, [L, L + 1])
    ref = target(torch.cat([committed, torch.tensor([[7, 8, 41, 42, 5]])], dim=1)).logits[0, -1]
    assert torch.allclose(target(torch.tensor([[5]]), kv_cache=cache).logits[0, -1], ref, atol=1e-4)
    L = cache.length - 1
    cache.crop(L)
    sib = torch.ones(1, 1, 3, L + 3, dtype=torch.bool)  # 51 and 52 siblings at position L, 53 after 52
    sib[..., L:] = torch.tensor([[True, False, False], [False, True, False], [False, True, True]])
    target(torch.tensor([[51, 52, 53]]), positions=torch.tensor([L, L, L + 1]), kv_cache=cache,
           attn_mask_override=sib)
    cache.keep(L, [L + 1, L + 2])  # 52, 53 at positions L, L+1
    ref = target(torch.cat([committed, torch.tensor([[7, 8, 41, 42, 52, 53, 6]])], dim=1)).logits[0, -1]
    assert torch.allclose(target(torch.tensor([[6]]), kv_cache=cache).logits[0, -1], ref, atol=1e-4)
    cache.keep(2, [])  # keeping nothing after slot 2 is a crop
    assert cache.length == 2
    with pytest.raises(ValueError, match="not all in"):
        cache.keep(0, [5])
    with pytest.raises(ValueError, match="cannot keep from slot"):
        cache.keep(3, [0])


@torch.no_grad()
@pytest.mark.parametrize("layers", [(1, 3), (1, 2), (2,)])
def test_a_drafters_context_is_the_targets_hidden_states_at_its_layers(target, tokenizer, layers) -> None:
    """The row's stored hidden states cover the union of the drafters' layers (here 1, 2, 3); each
    drafter's context is its own layers' columns, in its order, whether they sit together (read as
    a view) or not (gathered)."""
    from diffspec.decoding.meter import CostMeter, MeteredModel
    from diffspec.speculative.d2sd import _TargetState

    prompt = [5, 9, 14, 3, 7]
    st = _TargetState(MeteredModel(target, CostMeter(), "target"), prompt, [1, 2, 3], 16, 0.0,
                      torch.Generator().manual_seed(0))
    d = make_drafter(target, tokenizer, target_layers=layers)
    ctx, pos = st.context(d)
    ref = torch.cat(target(torch.tensor([prompt]), hidden_layers=list(layers)).hidden_states, dim=-1)
    assert torch.equal(pos, torch.arange(len(prompt)))
    assert torch.allclose(ctx, ref, atol=1e-5)


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [2, 4, 8])
def test_dflash_equals_ar_greedy(target, drafters, tokenizer, gamma) -> None:
    cfg = DFlashSpecConfig(gen_length=14, gamma=gamma)
    ar = ar_generate(target, tokenizer, PROMPTS, cfg)
    res = dflash_generate(target, drafters["block"], tokenizer, PROMPTS, cfg)
    assert res.raw_ids == ar.raw_ids and res.token_ids == ar.token_ids and res.texts == ar.texts
    s, m = res.stats, res.meter
    assert m.primary == "target" and set(m.models) == {"target", "drafter"}
    assert m.models["target"].nfe == s["rounds"] + len(PROMPTS)
    assert m.models["drafter"].nfe == s["drafter_forwards"] <= s["rounds"]
    assert m.tokens_generated == sum(len(r) for r in res.raw_ids)
    assert s["max_tree_nodes"] <= gamma and 1 <= s["acceptance_length"] <= gamma


@pytest.mark.parametrize("k, gamma, gamma2", [(1, 4, 4), (2, 4, 8), (4, 8, 16), (3, 3, 12)])
def test_d2sd_equals_ar_greedy(target, drafters, tokenizer, k, gamma, gamma2) -> None:
    cfg = D2SDConfig(gen_length=16, gamma=gamma, gamma2=gamma2, k=k)
    ar = ar_generate(target, tokenizer, PROMPTS, cfg)
    res = d2sd_generate(target, drafters["block"], drafters["vp"], tokenizer, PROMPTS, cfg)
    assert res.raw_ids == ar.raw_ids and res.token_ids == ar.token_ids
    s, m = res.stats, res.meter
    assert set(m.models) == {"target", "drafter", "vp_drafter"} and m.primary == "target"
    assert m.models["target"].nfe == s["rounds"] + len(PROMPTS)  # one target forward per round
    assert m.models["vp_drafter"].nfe == s["vp_forwards"] == m.models["drafter"].nfe  # ONE batched VP call
    assert m.models["vp_drafter"].max_batch <= k + 1 and s["mean_vp_batch"] >= 1
    assert s["max_tree_nodes"] <= 1 + (k + 1) * (gamma2 - 1)
    assert m.tokens_per_forward == pytest.approx(m.tokens_generated / (s["rounds"] + len(PROMPTS)))


def test_dflash_verifies_only_the_first_drafts(target, tokenizer) -> None:
    """drafts=n: each round verifies the anchor and the first n drafts, so a perfect drafter yields n + 1
    tokens a round instead of γ, with AR greedy's ids; D²SD's boundaries come from those n drafts."""
    prompt, budget, gamma = PROMPTS[0], 30, 8
    block, vp = oracle_drafters(target, tokenizer, prompt, budget, gamma, 16)
    ar = ar_generate(target, tokenizer, [prompt], ARConfig(gen_length=budget, stop_at_eos=False))
    for n in (1, 3, 7):
        cfg = DFlashSpecConfig(gen_length=budget, gamma=gamma, drafts=n, stop_at_eos=False)
        res = dflash_generate(target, block, tokenizer, [prompt], cfg)
        assert res.raw_ids == ar.raw_ids
        assert res.stats["max_tree_nodes"] == n + 1 and res.stats["rounds"] == -(-(budget - 1) // (n + 1))
    d2 = d2sd_generate(target, block, vp, tokenizer, [prompt],
                       D2SDConfig(gen_length=budget, gamma=gamma, gamma2=16, k=4, drafts=2, stop_at_eos=False))
    assert d2.raw_ids == ar.raw_ids and d2.stats["max_tree_nodes"] <= 1 + 3 * 15  # k clipped to 2 boundaries
    # branch caps every branch (the oracle's would run to γ₂ − 1 = 15): the tree and each round stay short
    capped = d2sd_generate(target, block, vp, tokenizer, [prompt], D2SDConfig(
        gen_length=budget, gamma=gamma, gamma2=16, k=2, drafts=3, branch=5, stop_at_eos=False))
    assert capped.raw_ids == ar.raw_ids and capped.stats["max_tree_nodes"] == 1 + 5  # all branches agree: one path
    assert capped.stats["acceptance_length"] == pytest.approx(6.0, abs=0.5)
    with pytest.raises(ValueError, match="drafts..γ₂ − 1 = 3..15"):
        D2SDConfig(gamma=8, gamma2=16, drafts=3, branch=2)
    for kw, match in [(dict(drafts=8), "0..7"), (dict(drafts=-1), "0..7"), (dict(drafts="3"), "drafts must be")]:
        with pytest.raises(ValueError, match=match):
            DFlashSpecConfig(gamma=8, **kw)
    with pytest.raises(ValueError, match="D²SD sizes its tree with k=auto"):
        D2SDConfig(drafts="auto")


def test_a_round_unsure_of_its_first_two_drafts_verifies_one(target, tokenizer) -> None:
    """shorten_below: where the drafter's confidence in its first two drafts (their product) is below
    it, the round verifies only the first (a 2-node chain); above it, every draft. Output: AR greedy's."""
    prompt, budget, gamma = PROMPTS[0], 24, 8
    block, _ = oracle_drafters(target, tokenizer, prompt, budget, gamma, 16)
    block.wrong = (2,)  # the second draft is wrong and drafted with low confidence (~0.02), the first ~0.99
    ar = ar_generate(target, tokenizer, [prompt], ARConfig(gen_length=budget, stop_at_eos=False))
    base = DFlashSpecConfig(gen_length=budget, gamma=gamma, drafts=4, stop_at_eos=False)
    plain = dflash_generate(target, block, tokenizer, [prompt], base)
    short = dflash_generate(target, block, tokenizer, [prompt], base.replace(shorten_below=0.5))
    kept = dflash_generate(target, block, tokenizer, [prompt], base.replace(shorten_below=0.01))
    assert plain.raw_ids == short.raw_ids == kept.raw_ids == ar.raw_ids
    assert short.stats["max_tree_nodes"] == 2 and short.stats["rounds"] == plain.stats["rounds"]
    assert plain.stats["max_tree_nodes"] == kept.stats["max_tree_nodes"] == 5
    assert short.stats["accepted"] == plain.stats["accepted"]  # the second draft was never right: nothing lost
    assert short.stats["drafted"] < plain.stats["drafted"] / 3
    for kw, match in [(dict(shorten_below=1.5), r"in \[0, 1\]"), (dict(shorten_below=0.3, drafts="auto"),
                      "drafts=auto chooses shorten_below"), (dict(shorten_below=0.3, drafts=1), "drafts >= 2")]:
        with pytest.raises(ValueError, match=match):
            DFlashSpecConfig(gamma=8, **kw)
    with pytest.raises(ValueError, match="D²SD's tree re-anchors"):
        D2SDConfig(gamma=8, gamma2=16, shorten_below=0.3)


def test_auto_drafts_decodes_as_the_count_it_chose_and_reports_it(target, drafters, tokenizer) -> None:
    from diffspec.speculative import sizing

    sizing._CHOSEN.clear()
    t = copy.deepcopy(target)
    t.config.eos_token_id = tokenizer.vocab_size - 1  # an id no answer reaches: the calibration runs 64 tokens
    block = copy.deepcopy(drafters["block"]).bind(t)
    cfg = DFlashSpecConfig(gen_length=16, gamma=8, drafts="auto")
    res = dflash_generate(t, block, tokenizer, PROMPTS, cfg)
    report = res.stats["auto_drafts"]
    n = report["chosen"]
    chosen = report.get("chosen_settings", {"drafts": n})
    plain = [c for c in report["candidates"] if "shorten_below" not in c]
    assert [c["drafts"] for c in plain] == [1, 2, 3, 4, 6, 7] and n in (1, 2, 3, 4, 5, 6, 7)  # γ − 1 too
    assert {(c["drafts"], c["shorten_below"]) for c in report["candidates"][6:]} == \
        {(d, t) for d in (4, 5, 6) for t in (0.15, 0.3, 0.45)}  # the shortened counts that fit γ − 1 = 7
    assert report["calibration_tokens"] == 64 and not report["remembered"] and res.config.drafts == "auto"
    # the widest decode's confidences reached the estimate (through the runner's streamer): a shortened
    # count prices some rounds at one draft, so it is not its plain count's twin
    plain_ms = {c["drafts"]: c["width_ms"] for c in plain}
    assert any(c["width_ms"] < plain_ms[c["drafts"]] for c in report["candidates"][6:] if c["drafts"] in plain_ms)
    fixed = dflash_generate(t, block, tokenizer, PROMPTS, cfg.replace(**chosen))
    assert res.raw_ids == fixed.raw_ids == ar_generate(t, tokenizer, PROMPTS, cfg).raw_ids
    assert res.meter.nfe == fixed.meter.nfe and res.meter.wall_seconds >= report["calibration_seconds"]
    # estimated from one decode at the widest count: its τ is that decode's, the others' are no more
    assert report["estimate"] == "chain" and report["measured"]["drafts"] == 7 and report["measured"]["rounds"] > 0
    widest = dflash_generate(t, block, tokenizer, PROMPTS[:1], cfg.replace(drafts=7, gen_length=64))
    taus = [c["acceptance_length"] for c in plain]
    assert taus[-1] == pytest.approx(widest.stats["acceptance_length"]) and taus == sorted(taus)
    assert all(c["width_ms"] > 0 and c["round_ms"] >= c["width_ms"] for c in report["candidates"])
    again = dflash_generate(t, copy.deepcopy(block), tokenizer, PROMPTS[:1], cfg)
    assert again.stats["auto_drafts"]["remembered"] and again.stats["auto_drafts"]["chosen"] == n
    # D²SD's K candidates stop at the round's boundaries: drafts=2 gives 2, so K = 4 would repeat K = 2
    few = d2sd_generate(t, block, copy.deepcopy(drafters["vp"]).bind(t), tokenizer, PROMPTS[:1],
                        D2SDConfig(gen_length=8, gamma=8, gamma2=16, k="auto", drafts=2))
    assert [c["k"] for c in few.stats["auto_k"]["candidates"]] == [1, 2]
    # D²SD's k=auto with the same drafter is another memo entry, not this one
    vp = copy.deepcopy(drafters["vp"]).bind(t)
    assert not d2sd_generate(t, block, vp, tokenizer, PROMPTS[:1], D2SDConfig(gen_length=8, gamma=8, gamma2=16,
                                                                             k="auto")).stats["auto_k"]["remembered"]


def test_estimate_chain_reads_each_round_and_prices_each_width() -> None:
    """The chain estimate: rounds from the streamer (the prefill's token is no round), τ(n) = 1 + the
    mean of min(accepted, n), a round's cost = what the widest decode spent beside the parts that grow
    with n + those parts at n; the fastest predicted count wins (ties: the fewer drafts)."""
    from diffspec.speculative.sizing import estimate_chain

    now = [0.0]

    def run(n, streamer):  # the prefill's token, then 4 rounds that accepted min(4, 2, 0, 4; n) drafts
        for a in (None, 4, 2, 0, 4):
            size = 1 if a is None else min(a, n) + 1
            streamer.on_commit(0, list(range(size)), [7] * size)
        now[0] += 4 * (0.020 + verify[n])  # a round: 20 ms and the verification
        return 15, {}

    verify = {1: 0.050, 2: 0.060, 4: 0.080}  # what grows with n drafts: verifying n + 1 tokens
    n, report = estimate_chain(run, [1, 2, 4], lambda ns: {k: verify[k] for k in ns}, "drafts",
                               clock=lambda: now[0])
    rows = {r["drafts"]: r for r in report["candidates"]}
    assert [rows[k]["acceptance_length"] for k in (1, 2, 4)] == pytest.approx([1.75, 2.5, 3.5])
    assert [rows[k]["round_ms"] for k in (1, 2, 4)] == pytest.approx([70, 80, 100])
    assert n == 4 and rows[4]["tokens_per_second"] == pytest.approx(35.0)  # 2.5 / 0.08 = 31.25 at 2
    assert report["measured"] == pytest.approx({"drafts": 4, "rounds": 4, "round_ms": 100, "other_ms": 20})
    verify[4] = 0.200  # a dear wide verification: two drafts win
    assert estimate_chain(run, [1, 2, 4], lambda ns: {k: verify[k] for k in ns}, "drafts",
                          clock=lambda: now[0])[0] == 2
    # a shortened candidate: rounds whose first two confidences multiply below t verify one draft
    confs = {"rounds": [[0.9, 0.9], [0.9, 0.2], [0.3, 0.9], [0.95, 0.9]]}  # products 0.81, 0.18, 0.27, 0.855

    def run_conf(n, streamer):
        for a, conf in zip((None, 4, 2, 0, 4), [None, *confs["rounds"]]):
            if conf is not None:
                streamer.on_draft(0, conf)
            size = 1 if a is None else min(a, n) + 1
            streamer.on_commit(0, list(range(size)), [7] * size)
        now[0] += 4 * (0.020 + verify[n])
        return 15, {}

    verify[4] = 0.080
    short = (("drafts", 4), ("shorten_below", 0.5))
    best, report = estimate_chain(run_conf, [4, short], lambda ns: {k: verify[k] for k in ns}, "drafts",
                                  clock=lambda: now[0])
    rows = report["candidates"]
    # rounds 2 and 3 verify one draft: accepted min(2, 1) = 1 and min(0, 1) = 0
    assert rows[1]["acceptance_length"] == pytest.approx(1 + (4 + 1 + 0 + 4) / 4)
    assert rows[1]["round_ms"] == pytest.approx(20 + (80 + 50 + 50 + 80) / 4)
    assert best == short and report["chosen"] == 4 and report["chosen_settings"] == {"drafts": 4, "shorten_below": 0.5}


def test_forward_seconds_times_each_width_once_per_pass(target) -> None:
    from diffspec.speculative.sizing import forward_seconds

    ticks = iter(range(10_000))
    got = forward_seconds(target, [3, 4, 5, 6], [1, 3, 2], repeats=2, clock=lambda: float(next(ticks)))
    assert sorted(got) == [1, 2, 3] and all(v == 1.0 for v in got.values())  # each timed call: one tick
    with pytest.raises(ValueError, match="a context and at least one width"):
        forward_seconds(target, [], [1])


def test_stop_at_eos(target, drafters, tokenizer) -> None:
    free = ar_generate(target, tokenizer, PROMPTS[:1], ARConfig(gen_length=12, stop_at_eos=False)).raw_ids[0]
    eos = free[4]
    first = free.index(eos)
    t = copy.deepcopy(target)
    t.config.eos_token_id = eos
    block, vp = copy.deepcopy(drafters["block"]).bind(t), copy.deepcopy(drafters["vp"]).bind(t)
    cfg = D2SDConfig(gen_length=12, gamma=4, gamma2=8, k=2)
    for res in (dflash_generate(t, block, tokenizer, PROMPTS[:1], cfg),
                d2sd_generate(t, block, vp, tokenizer, PROMPTS[:1], cfg)):
        assert res.raw_ids[0] == free[:first + 1] and res.token_ids[0] == free[:first]
        assert res.meter.tokens_generated == first + 1


# --- oracle drafters: long acceptances, deep trees ----------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_oracle_drafters_give_long_acceptances(target, tokenizer, prompt) -> None:
    budget, gamma, gamma2 = 40, 8, 16
    block, vp = oracle_drafters(target, tokenizer, prompt, budget, gamma, gamma2)
    ar = ar_generate(target, tokenizer, [prompt], ARConfig(gen_length=budget, stop_at_eos=False))
    cfg = D2SDConfig(gen_length=budget, gamma=gamma, gamma2=gamma2, k=2, stop_at_eos=False)

    perfect = dflash_generate(target, block, tokenizer, [prompt], cfg)
    assert perfect.raw_ids == ar.raw_ids
    assert perfect.stats["accepted"] == perfect.stats["drafted"]  # every draft accepted
    assert perfect.stats["rounds"] == -(-(budget - 1) // gamma)  # γ tokens per round
    assert perfect.stats["acceptance_length"] > gamma - 1

    block.wrong = (4,)  # the first draft breaks at d_4 (low confidence): DFlash keeps d_1..d_3 + bonus
    broken = dflash_generate(target, block, tokenizer, [prompt], cfg)
    assert broken.raw_ids == ar.raw_ids
    assert broken.stats["acceptance_length"] == pytest.approx(4.0, abs=0.5)

    d2 = d2sd_generate(target, block, vp, tokenizer, [prompt], cfg)
    assert d2.raw_ids == ar.raw_ids
    s = d2.stats
    # The posterior puts its mass on "3 accepted"; the VP drafter re-anchors there and runs to γ₂.
    assert s["acceptance_length"] > 2 * broken.stats["acceptance_length"]
    assert s["rounds"] == -(-(budget - 1) // gamma2)  # γ₂ tokens per round (the last one cut by the budget)
    assert s["max_tree_nodes"] > gamma2  # several deep branches in one tree
    assert d2.meter.models["target"].nfe == s["rounds"] + 1 < broken.meter.models["target"].nfe


def test_drafts_are_cut_after_an_eos(target, tokenizer) -> None:
    """Tokens drafted after an EOS can never be emitted, so the verified tree stops there."""
    prompt, gamma, gamma2 = PROMPTS[0], 8, 16
    greedy = greedy_sequence(target, tokenizer, prompt, 40)
    gen = greedy[len(tokenizer.encode(prompt)):]
    first = next(j for j in range(2, 7) if gen.index(gen[j]) == j)  # a token whose first occurrence is j
    t = copy.deepcopy(target)
    t.config.eos_token_id = gen[first]
    block = make_drafter(t, tokenizer, cls=Oracle, block_size=gamma)
    vp = make_drafter(t, tokenizer, cls=Oracle, block_size=gamma2)
    block.greedy = vp.greedy = greedy
    cfg = D2SDConfig(gen_length=40, gamma=gamma, gamma2=gamma2, k=2)
    for res in (dflash_generate(t, block, tokenizer, [prompt], cfg), d2sd_generate(t, block, vp, tokenizer, [prompt], cfg)):
        assert res.raw_ids[0] == gen[:first + 1] and res.stats["rounds"] == 1
        assert res.stats["max_tree_nodes"] == first + 1  # the anchor gen[0] and the drafts gen[1..first]


@pytest.mark.parametrize("k, gamma, gamma2, wrong, vp_wrong", [
    (1, 4, 4, (2,), (3,)), (2, 6, 12, (1, 4), (7,)), (4, 8, 16, (3, 5), (6, 11)), (3, 8, 8, (7,), ())])
def test_noisy_oracles_stay_exact(target, tokenizer, k, gamma, gamma2, wrong, vp_wrong) -> None:
    """Drafts that break at several depths in both drafters: partial acceptances inside deep branches."""
    budget = 30
    block = make_drafter(target, tokenizer, cls=Oracle, block_size=gamma)
    vp = make_drafter(target, tokenizer, cls=Oracle, block_size=gamma2)
    block.wrong, vp.wrong = wrong, vp_wrong
    cfg = D2SDConfig(gen_length=budget, gamma=gamma, gamma2=gamma2, k=k, stop_at_eos=False)
    for prompt in PROMPTS:
        block.greedy = vp.greedy = greedy_sequence(target, tokenizer, prompt, budget + gamma2)
        ar = ar_generate(target, tokenizer, [prompt], cfg)
        d2 = d2sd_generate(target, block, vp, tokenizer, [prompt], cfg)
        df = dflash_generate(target, block, tokenizer, [prompt], cfg)
        assert d2.raw_ids == ar.raw_ids == df.raw_ids
        assert 0 < d2.stats["accepted"] < d2.stats["drafted"]
        assert d2.stats["acceptance_length"] >= df.stats["acceptance_length"]


# --- top-K = rejection boundaries; per-round branch statistics ------------------------------------


def test_k1_anchors_one_boundary_per_round_besides_the_first_draft(target, tokenizer) -> None:
    """Perfect, confident drafts: "all accepted" has nearly all the posterior mass, yet with K=1 the
    VP drafter still re-anchors one true boundary every round, next to the first draft's own branch
    (it would get no anchor at all if "all accepted" could take the K slot)."""
    budget, gamma, gamma2 = 30, 4, 8
    prompt = PROMPTS[0]
    block, vp = oracle_drafters(target, tokenizer, prompt, budget, gamma, gamma2)
    cfg = D2SDConfig(gen_length=budget, gamma=gamma, gamma2=gamma2, k=1, stop_at_eos=False)
    res = d2sd_generate(target, block, vp, tokenizer, [prompt], cfg)
    assert res.raw_ids == ar_generate(target, tokenizer, [prompt], cfg).raw_ids
    s = res.stats
    assert s["anchored_rounds"] == {"1": s["drafter_forwards"]} and s["mean_anchored"] == 1.0
    assert s["anchored"] == s["drafter_forwards"]
    # the first-draft window (extended to γ₂) plus the one anchor, except where the budget leaves nothing to extend
    assert s["vp_windows"] <= 2 * s["vp_forwards"] and s["mean_vp_batch"] > 1.5
    assert s["wins"] == {"first_draft": s["rounds"]}  # perfect drafts: the first-draft branch always wins


@pytest.mark.parametrize("k", [2, 8])
def test_k_is_clipped_to_the_drafts_of_a_round(target, drafters, tokenizer, k) -> None:
    gamma = 4  # three drafts, so at most three boundaries
    cfg = D2SDConfig(gen_length=12, gamma=gamma, gamma2=8, k=k, stop_at_eos=False)
    res = d2sd_generate(target, drafters["block"], drafters["vp"], tokenizer, PROMPTS, cfg)
    assert res.raw_ids == ar_generate(target, tokenizer, PROMPTS, cfg).raw_ids
    hist = res.stats["anchored_rounds"]
    assert max(int(n) for n in hist) == min(k, gamma - 1)  # fewer only where the budget cut the draft
    assert res.meter.models["vp_drafter"].max_batch <= min(k, gamma - 1) + 1
    assert sum(hist.values()) == res.stats["drafter_forwards"]


def test_winning_branch_statistics(target, tokenizer) -> None:
    """The first draft breaks at d_3 (low confidence): the posterior's top boundary is 2 accepted,
    the VP branch re-anchored there runs on, and it wins those rounds with more tokens."""
    budget, gamma, gamma2 = 40, 8, 16
    prompt = PROMPTS[1]
    block, vp = oracle_drafters(target, tokenizer, prompt, budget, gamma, gamma2)
    block.wrong = (3,)
    cfg = D2SDConfig(gen_length=budget, gamma=gamma, gamma2=gamma2, k=2, stop_at_eos=False)
    res = d2sd_generate(target, block, vp, tokenizer, [prompt], cfg)
    assert res.raw_ids == ar_generate(target, tokenizer, [prompt], cfg).raw_ids
    s = res.stats
    assert set(s["wins"]) <= {"first_draft", "anchor_1", "anchor_2", "none"}
    assert sum(s["wins"].values()) == s["rounds"] and sum(s["win_accepted"].values()) == s["accepted"]
    assert s["wins"].get("anchor_1", 0) >= s["rounds"] - 1  # the last round may be cut by the budget
    assert s["mean_accepted_by_winner"]["anchor_1"] > 2
    assert list(s["wins"]) == sorted(s["wins"], key=["first_draft", "anchor_1", "anchor_2", "none"].index)
    df = dflash_generate(target, block, tokenizer, [prompt], cfg).stats
    assert set(df["wins"]) <= {"first_draft", "none"} and df["anchored"] == 0 and df["anchored_rounds"] == {}


# --- errors -------------------------------------------------------------------------------------


def test_errors(target, drafters, tokenizer) -> None:
    cfg = D2SDConfig(gen_length=8, gamma=4, gamma2=8, k=2)
    block, vp = drafters["block"], drafters["vp"]
    wide = make_target(tokenizer, vocab_size=tokenizer.vocab_size + 8)
    with pytest.raises(ValueError, match="drafter: drafter vocab_size"):
        dflash_generate(target, make_drafter(wide, tokenizer), tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="vp_drafter: drafter vocab_size"):
        d2sd_generate(target, block, make_drafter(wide, tokenizer), tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="hidden_size"):
        d2sd_generate(target, make_drafter(make_target(tokenizer, hidden_size=64), tokenizer), vp, tokenizer,
                      PROMPTS, cfg)
    with pytest.raises(ValueError, match="out of range"):
        dflash_generate(make_target(tokenizer, num_hidden_layers=2), block, tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="must be a DFlashDrafter"):
        dflash_generate(target, target, tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="D2SDConfig"):
        d2sd_generate(target, block, vp, tokenizer, PROMPTS, DFlashSpecConfig())
    with pytest.raises(ValueError, match="DFlashSpecConfig"):
        dflash_generate(target, block, tokenizer, PROMPTS, SpecConfig())
    with pytest.raises(ValueError, match="needs a vp_drafter"):
        d2sd_generate(target, block, None, tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        d2sd_generate(target, block, vp, tokenizer, ["1+1", " "], cfg)


def test_a_narrow_draft_vocabulary_keeps_the_output_and_costs_less(target, drafters, tokenizer) -> None:
    """The drafters propose from 40 ids only: the target still verifies over its whole vocabulary, so
    DFlash and D²SD keep AR greedy's ids; the drafters' FLOPs fall (a head of 40 rows, not the vocabulary)."""
    cfg = D2SDConfig(gen_length=16, gamma=4, gamma2=8, k=2)
    ar = ar_generate(target, tokenizer, PROMPTS, cfg)
    wide = d2sd_generate(target, drafters["block"], drafters["vp"], tokenizer, PROMPTS, cfg)
    block, vp = copy.deepcopy(drafters["block"]), copy.deepcopy(drafters["vp"])
    few = sorted({t for r in ar.raw_ids for t in r})[:40]
    block.set_draft_vocab(few), vp.set_draft_vocab(few)
    for res in (dflash_generate(target, block, tokenizer, PROMPTS, cfg),
                d2sd_generate(target, block, vp, tokenizer, PROMPTS, cfg)):
        assert res.raw_ids == ar.raw_ids
    narrow = d2sd_generate(target, block, vp, tokenizer, PROMPTS, cfg)
    per_call = {m: narrow.meter.models[m].flops / narrow.meter.models[m].nfe for m in ("drafter", "vp_drafter")}
    assert all(per_call[m] < wide.meter.models[m].flops / wide.meter.models[m].nfe for m in per_call)


def test_greedy_drafts_never_build_full_vocabulary_logits(target, drafters, tokenizer, monkeypatch) -> None:
    """With a draft vocabulary, a greedy round reads the drafters' compact logits (draft-vocabulary
    columns only): the −inf-filled full-vocabulary form is never built, and the ids stay AR greedy's.
    Ties in the compact columns go to the lowest target id, as an argmax over the whole vocabulary."""
    from diffspec.models import dflash as dflash_module
    from diffspec.speculative.d2sd import _pick_drafts

    cfg = D2SDConfig(gen_length=16, gamma=4, gamma2=8, k=2)
    ar = ar_generate(target, tokenizer, PROMPTS, cfg)
    block, vp = copy.deepcopy(drafters["block"]), copy.deepcopy(drafters["vp"])
    few = sorted({t for r in ar.raw_ids for t in r}, reverse=True)[:40]  # not in id order
    block.set_draft_vocab(few), vp.set_draft_vocab(few)

    def refuse(*a, **kw):
        raise AssertionError("a greedy round built full-vocabulary drafter logits")

    monkeypatch.setattr(dflash_module, "draft_logits", refuse)
    for res in (dflash_generate(target, block, tokenizer, PROMPTS, cfg),
                d2sd_generate(target, block, vp, tokenizer, PROMPTS, cfg)):
        assert res.raw_ids == ar.raw_ids
    ids = torch.tensor([3, 9, 20])  # compact columns' target ids, ascending
    drafts, _, q = _pick_drafts(torch.tensor([[1.0, 5.0, 5.0]]), 0.0, False, torch.Generator(), lambda c: ids[c])
    assert drafts == [9] and q is None
    with pytest.raises(ValueError, match="whole vocabulary"):
        _pick_drafts(torch.tensor([[1.0, 5.0, 5.0]]), 0.7, True, torch.Generator(), lambda c: ids[c])


def test_drafter_context_is_projected_once_per_committed_token(target, drafters, tokenizer) -> None:
    """With the ContextKV, each committed cell goes through a drafter layer's k_proj once in a row's
    whole decode (window cells once per call); recomputing the context every call would project the
    prompt again in every round."""
    cfg = DFlashSpecConfig(gen_length=16, gamma=4)
    d = drafters["block"]
    rows = []
    hook = d.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[:-1].numel()))
    try:
        res = dflash_generate(target, d, tokenizer, PROMPTS[:1], cfg)
    finally:
        hook.remove()
    calls = res.stats["drafter_forwards"]
    P = len(tokenizer.encode(PROMPTS[0]))
    context_cells = sum(rows) - 4 * calls  # each call's window: 4 cells
    assert calls >= 2 and P <= context_cells <= P + len(res.raw_ids[0]) - 1
    assert context_cells < calls * P  # what recomputing the context in every call would project at least


# --- k="auto": the tree sized on this device ----------------------------------------------------


def test_auto_k_decodes_as_the_k_it_chose_and_reports_it(target, drafters, tokenizer) -> None:
    from diffspec.speculative import sizing

    sizing._CHOSEN.clear()
    t = copy.deepcopy(target)
    t.config.eos_token_id = tokenizer.vocab_size - 1  # an id no answer reaches: the calibration runs 64 tokens
    block, vp = copy.deepcopy(drafters["block"]).bind(t), copy.deepcopy(drafters["vp"]).bind(t)
    cfg = D2SDConfig(gen_length=16, gamma=8, gamma2=8, k="auto")
    res = d2sd_generate(t, block, vp, tokenizer, PROMPTS, cfg)
    report = res.stats["auto_k"]
    k = report["chosen"]
    chosen = report.get("chosen_settings") or {"k": k}
    # γ − 1 = 7 boundaries: K up to 4; then the four small trees (drafts and branch were left at defaults)
    assert [c["k"] for c in report["candidates"]] == [1, 2, 4, 1, 2, 1, 2] and k in (1, 2, 4)
    small = report["candidates"][3:]
    assert [(c["drafts"], c["branch"]) for c in small] == [(3, 4), (3, 4), (3, 6), (3, 6)]
    assert max(c["mean_tree_nodes"] for c in small) < report["candidates"][2]["mean_tree_nodes"]
    assert report["calibration_tokens"] == 64 and not report["remembered"]  # whatever the request's length
    assert all(c["tokens"] == 64 for c in report["candidates"]) and report["calibration_forwards"] > 0
    fixed = d2sd_generate(t, block, vp, tokenizer, PROMPTS, cfg.replace(**chosen))
    assert res.raw_ids == fixed.raw_ids == ar_generate(t, tokenizer, PROMPTS, cfg).raw_ids
    # the run is the chosen K's own (the calibration's forwards are reported, not mixed in): the tree
    # sizes differ between K even where the random drafters' acceptances do not
    assert res.meter.nfe == fixed.meter.nfe and res.meter.flops == fixed.meter.flops
    assert res.stats["mean_tree_nodes"] == fixed.stats["mean_tree_nodes"]
    assert len({c["mean_tree_nodes"] for c in report["candidates"][:3]}) == 3
    assert res.meter.wall_seconds >= report["calibration_seconds"]
    # drafters loaded again from the same weights (as every bench chunk and CLI call does) hit the memo
    again = d2sd_generate(t, copy.deepcopy(block), copy.deepcopy(vp), tokenizer, PROMPTS[:1], cfg)
    assert again.stats["auto_k"]["remembered"] and again.stats["auto_k"]["chosen"] == k
    again.stats["auto_k"]["chosen"] = 99  # a caller's edit does not reach the memo
    assert d2sd_generate(t, block, vp, tokenizer, PROMPTS[:1], cfg).stats["auto_k"]["chosen"] == k
    other = copy.deepcopy(vp)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # other weights: measured anew
    assert not d2sd_generate(t, block, other, tokenizer, PROMPTS[:1], cfg).stats["auto_k"]["remembered"]


def test_auto_k_keeps_the_default_when_the_answer_is_too_short_to_time(target, drafters, tokenizer) -> None:
    from diffspec.speculative import sizing

    sizing._CHOSEN.clear()
    first = ar_generate(target, tokenizer, PROMPTS[:1], ARConfig(gen_length=4, stop_at_eos=False)).raw_ids[0][0]
    t = copy.deepcopy(target)
    t.config.eos_token_id = first  # the answer is one EOS: no round, nothing to time
    block, vp = copy.deepcopy(drafters["block"]).bind(t), copy.deepcopy(drafters["vp"]).bind(t)
    res = d2sd_generate(t, block, vp, tokenizer, PROMPTS[:1], D2SDConfig(gen_length=16, gamma=8, gamma2=8, k="auto"))
    report = res.stats["auto_k"]
    assert report["too_short"] and report["chosen"] == sizing.DEFAULT_K == D2SDConfig().k and not report["candidates"]
    assert not sizing._CHOSEN.get(t)  # a default kept for want of a measurement is not remembered: the next
    # request, whose answer may be long enough, measures


def test_choose_size_takes_the_most_tokens_per_second() -> None:
    from diffspec.speculative.sizing import candidates, choose_size

    now = [0.0]
    seconds = {1: 2.0, 2: 1.0, 4: 1.5}  # K = 2 yields its 30 tokens fastest
    tokens = {1: 30, 2: 30, 4: 30}
    calls: list[int] = []

    def run(k: int) -> tuple[int, dict]:
        calls.append(k)
        now[0] += seconds[k] + (5.0 if len(calls) == 3 else 0.0)  # one slow spell: the best of two runs counts
        return tokens[k], {"acceptance_length": 2.0}

    k, report = choose_size(run, [1, 2, 4], clock=lambda: now[0])
    assert k == 2 and calls == [1, 1, 2, 4, 4, 2, 1]  # a warm-up, then both orders
    calls.clear()
    assert choose_size(run, [1, 2, 4], clock=lambda: now[0], warm=False)[0] == 2 and calls == [1, 2, 4, 4, 2, 1]
    assert [c["seconds"] for c in report["candidates"]] == [2.0, 1.0, 1.5] and "chosen_settings" not in report
    assert report["candidates"][1]["tokens_per_second"] == 30.0
    tokens[4] = 60  # now K = 4 yields twice the tokens in 1.5 s
    assert choose_size(run, [1, 2, 4], clock=lambda: now[0])[0] == 4
    assert choose_size(run, [4], clock=lambda: now[0])[0] == 4  # one candidate: nothing to time
    assert candidates(16) == [1, 2, 4, 8] and candidates(3) == [1, 2] and candidates(2) == [1]
    # a candidate that sets several fields (D²SD's small trees): its row and the report name them all;
    # a tie goes to the candidate listed first
    tree = (("k", 1), ("drafts", 3), ("branch", 4))
    seconds[tree], tokens[tree] = 1.0, 60
    best, report = choose_size(run, [2, tree], clock=lambda: now[0], warm=False)
    assert best == tree and report["chosen"] == 1 and report["chosen_settings"] == {"k": 1, "drafts": 3, "branch": 4}
    assert report["candidates"][1]["drafts"] == 3 and report["candidates"][1]["tokens_per_second"] == 60.0
    tokens[tree] = 30
    assert choose_size(run, [2, tree], clock=lambda: now[0], warm=False)[0] == 2


def test_small_trees_are_timed_only_where_drafts_and_branch_are_left_to_auto() -> None:
    from diffspec.speculative.d2sd import tree_candidates

    full = tree_candidates(D2SDConfig(k="auto"))
    assert full[:4] == [1, 2, 4, 8] and [dict(c) for c in full[4:]] == [
        {"k": 1, "drafts": 3, "branch": 4}, {"k": 2, "drafts": 3, "branch": 4},
        {"k": 1, "drafts": 3, "branch": 6}, {"k": 2, "drafts": 3, "branch": 6}]
    assert tree_candidates(D2SDConfig(k="auto", drafts=5)) == [1, 2, 4]  # the user's drafts stand
    assert tree_candidates(D2SDConfig(k="auto", branch=20)) == [1, 2, 4, 8]
    assert [dict(c)["branch"] for c in tree_candidates(D2SDConfig(k="auto", gamma=4, gamma2=6))[2:]] == [4, 4]


def test_auto_k_option_parsing_and_errors() -> None:
    from diffspec.bench.runner import parse_spec

    assert parse_spec("d2sd:k=auto")[1]["k"] == "auto" and parse_spec("d2sd:k=3")[1]["k"] == 3
    with pytest.raises(ValueError, match="k needs"):
        parse_spec("d2sd:k=many")
    with pytest.raises(ValueError, match="or 'auto'"):
        D2SDConfig(k="Auto ")


def test_round_sizes_pairs_each_round_with_its_drafts_confidences() -> None:
    """A round that drafted nothing (the budget's last token) has no confidences; an offset streamer
    (one batch of many) passes a round's confidences on under the row's own number."""
    from diffspec.decoding.streamer import OffsetStreamer
    from diffspec.speculative.sizing import RoundSizes

    rec = RoundSizes()
    rec.on_commit(0, [0], [5])  # the prefill's token
    rec.on_draft(0, [0.9, 0.4])
    rec.on_commit(0, [1, 2], [6, 7])
    rec.on_commit(0, [3], [8])  # no drafts this round
    assert rec.sizes == [1, 2, 1] and rec.confidences == [[], [0.9, 0.4], []]
    heard = []

    class Hear(RoundSizes):
        def on_draft(self, row, confidences):
            heard.append((row, list(confidences)))

    OffsetStreamer(Hear(), 3).on_draft(1, [0.5])
    assert heard == [(4, [0.5])]
