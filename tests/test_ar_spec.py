"""AR decoding and classic speculative decoding: exactness vs. AR greedy, the rejection rule, cost, errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from diffspec.models.causal import Qwen3Config, Qwen3Model
from diffspec.models.tokenizer import EOS_TOKEN
from diffspec.speculative.ar import (ARConfig, SpecConfig, ar_generate, greedy_accept, rejection_accept,
                              spec_generate)

TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
PROMPTS = ["Question: 12+7=", "Question: what is 3 * 45?\nAnswer:", "7", "Question: 100-1"]


def make_qwen(tokenizer, seed: int = 0, **overrides) -> Qwen3Model:
    """Tiny Qwen3 with weights large enough that logits have clear argmaxes (no near-ties)."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(**{**TINY, "vocab_size": tokenizer.vocab_size,
                         "eos_token_id": tokenizer.token_to_id(EOS_TOKEN), **overrides})
    model = Qwen3Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def target(tokenizer) -> Qwen3Model:
    return make_qwen(tokenizer, seed=0)


@pytest.fixture(scope="module")
def drafters(tokenizer, target) -> dict[str, Qwen3Model]:
    """An unrelated small drafter (rejects a lot), a perturbed copy (accepts some), and the target itself."""
    near = copy.deepcopy(target)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return {"small": make_qwen(tokenizer, seed=1, num_hidden_layers=1), "near": near, "self": target}


def with_eos(model: Qwen3Model, eos: int) -> Qwen3Model:
    m = copy.deepcopy(model)
    m.config.eos_token_id = eos
    return m


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(gen_length=0), "gen_length"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(batch_size=0), "batch_size"),
    (dict(gen_length="48"), "gen_length must be a int"),
    (dict(stop_at_eos=1), "stop_at_eos must be a bool"),
])
def test_config_validation(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        ARConfig(**kw)
    with pytest.raises(ValueError, match=match):
        SpecConfig(**kw)


def test_spec_config_gamma() -> None:
    assert SpecConfig().gamma == 4 and SpecConfig().gen_length == 48
    with pytest.raises(ValueError, match="gamma"):
        SpecConfig(gamma=0)
    assert SpecConfig(gamma=2).replace(temperature=1.0) == SpecConfig(gamma=2, temperature=1.0)
    assert SpecConfig(gamma=2).to_dict()["gamma"] == 2


# --- plain AR -----------------------------------------------------------------------------------


@torch.no_grad()
def reference_greedy(model: Qwen3Model, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Greedy decoding by full forwards, no cache: what the cached loop must reproduce."""
    out: list[int] = []
    for _ in range(n):
        t = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(t)
        if t == eos:
            break
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_ar_greedy_matches_uncached_reference(target, tokenizer, batch_size) -> None:
    cfg = ARConfig(gen_length=10, batch_size=batch_size)  # 3: left-padded batches of mixed length
    res = ar_generate(target, tokenizer, PROMPTS, cfg)
    eos = target.config.eos_token_id
    for p, raw in zip(PROMPTS, res.raw_ids):
        assert raw == reference_greedy(target, tokenizer.encode(p), 10, eos)
    assert res.meter.tokens_per_forward == 1.0
    assert res.meter.tokens_generated == sum(len(r) for r in res.raw_ids)


def test_ar_batch_drops_finished_rows_without_changing_answers(target, tokenizer, monkeypatch) -> None:
    """Rows ending at different steps leave the batch (their cache rows too), and every row's answer and
    hidden states stay exactly what it gets decoded alone by full forwards."""
    from diffspec.models.causal import CausalKVCache
    from diffspec.speculative.ar import ar_batch
    from diffspec.decoding.meter import CostMeter, MeteredModel

    alone = [reference_greedy(target, tokenizer.encode(p), 12, None) for p in PROMPTS]
    eos = alone[0][2]  # prompt 0 ends after 3 tokens; the others at their first copy of it, or at 12
    model = with_eos(target, eos)
    want = [a[:a.index(eos) + 1] if eos in a else a for a in alone]
    assert len({len(w) for w in want}) > 1, "the rows must end at different steps for this test to mean anything"
    dropped: list[list[int]] = []
    real = CausalKVCache.select_rows
    monkeypatch.setattr(CausalKVCache, "select_rows", lambda self, rows: (dropped.append(list(rows)), real(self, rows)))
    meter = CostMeter()
    rows, hidden = [tokenizer.encode(p) for p in PROMPTS], []
    out = ar_batch(MeteredModel(model, meter, "target"), rows, ARConfig(gen_length=12, batch_size=4),
                   frozenset({eos}), torch.Generator().manual_seed(0), [1, 2], hidden)
    assert out == want
    assert dropped and all(len(d) < 4 for d in dropped)
    for row, ans, h in zip(rows, out, hidden):
        with torch.no_grad():
            full = model(torch.tensor([row + ans[:-1]]), hidden_layers=[1, 2]).hidden_states
        assert torch.allclose(h, torch.cat(full, dim=-1)[0], atol=1e-5)


def test_ar_meter_charges_cache_keys(target, tokenizer) -> None:
    res = ar_generate(target, tokenizer, ["Question: 1+1="], ARConfig(gen_length=3, stop_at_eos=False))
    P = len(tokenizer.encode("Question: 1+1="))
    cost = res.meter.models["model"]
    assert cost.nfe == cost.sequence_forwards == 3 and len(res.raw_ids[0]) == 3
    expected = target.forward_flops(P, P) + target.forward_flops(1, P + 1) + target.forward_flops(1, P + 2)
    assert cost.flops == pytest.approx(expected)


# --- speculative, greedy ------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("which", ["small", "near", "self"])
def test_spec_greedy_equals_ar_greedy(target, drafters, tokenizer, gamma, which) -> None:
    cfg = SpecConfig(gen_length=14, gamma=gamma, batch_size=4)
    ar = ar_generate(target, tokenizer, PROMPTS, cfg)
    spec = spec_generate(target, drafters[which], tokenizer, PROMPTS, cfg)
    assert spec.raw_ids == ar.raw_ids and spec.token_ids == ar.token_ids and spec.texts == ar.texts
    s, m = spec.stats, spec.meter
    assert m.primary == "target" and set(m.models) == {"target", "drafter"}
    assert m.models["target"].nfe == s["rounds"] + len(PROMPTS)  # one prefill per prompt + one per round
    assert m.models["drafter"].nfe == s["drafted"]  # one drafter forward per drafted token
    assert m.tokens_generated == sum(len(r) for r in spec.raw_ids)
    assert m.tokens_per_forward == pytest.approx(m.tokens_generated / (s["rounds"] + len(PROMPTS)))
    assert 0 <= s["accepted"] <= s["drafted"] and 1 <= s["acceptance_length"] <= gamma + 1
    if which == "self":
        assert s["accepted"] == s["drafted"]
    if which == "near":  # partial acceptances: the crop-and-continue path is exercised
        assert 0 < s["accepted"] < s["drafted"]


@pytest.mark.parametrize("gamma, max_new", [(3, 13), (3, 11), (5, 20)])
def test_self_drafter_accepts_every_draft(target, tokenizer, gamma, max_new) -> None:
    """Drafter == target: every round accepts all drafts; only the last round may be shortened by the budget."""
    cfg = SpecConfig(gen_length=max_new, gamma=gamma, stop_at_eos=False)
    res = spec_generate(target, target, tokenizer, PROMPTS[:2], cfg)
    s = res.stats
    assert all(len(r) == max_new for r in res.raw_ids)
    assert s["accepted"] == s["drafted"] == 2 * (max_new - 1 - s["rounds"] // 2)
    assert s["rounds"] == 2 * math.ceil((max_new - 1) / (gamma + 1))
    if (max_new - 1) % (gamma + 1) == 0:
        assert s["acceptance_length"] == gamma + 1
    assert res.meter.tokens_per_forward == pytest.approx(max_new / (1 + s["rounds"] // 2))


def test_stop_at_eos(target, drafters, tokenizer) -> None:
    free = ar_generate(target, tokenizer, PROMPTS[:1], ARConfig(gen_length=12, stop_at_eos=False)).raw_ids[0]
    eos = free[4]
    first = free.index(eos)
    t, d = with_eos(target, eos), with_eos(drafters["near"], eos)
    cfg = SpecConfig(gen_length=12, gamma=3)
    ar = ar_generate(t, tokenizer, PROMPTS[:1], cfg)
    spec = spec_generate(t, d, tokenizer, PROMPTS[:1], cfg)
    for res in (ar, spec):
        assert res.raw_ids[0] == free[:first + 1] and res.token_ids[0] == free[:first]
        assert res.meter.tokens_generated == first + 1


# --- a drafter with a draft vocabulary ----------------------------------------------------------


@torch.no_grad()
def test_draft_vocabulary_narrows_an_ar_drafters_head(drafters, tokenizer) -> None:
    d = copy.deepcopy(drafters["near"])
    ids = torch.tensor([[3, 9, 27, 4]])
    full = d(ids).logits
    vocab = [5, 17, 40, 0, 2]
    d.set_draft_vocab(vocab)
    small = d(ids).logits
    keep = torch.zeros(full.shape[-1], dtype=torch.bool)
    keep[vocab] = True
    assert torch.isneginf(small[..., ~keep]).all()
    assert torch.allclose(small[..., keep], full[..., keep], atol=1e-5)
    H, V = d.config.hidden_size, d.config.vocab_size
    saved = d.forward_flops(1, 10)
    assert d.set_draft_vocab(None).forward_flops(1, 10) - saved == pytest.approx(2.0 * H * (V - len(vocab)))
    for bad in ([], [V], [1, 1]):
        with pytest.raises(ValueError, match="draft vocabulary"):
            d.set_draft_vocab(bad)
    # another vocabulary of the same length, after the first was dropped: its own head rows, not cached ones
    other = [6, 18, 41, 1, 3]
    d.set_draft_vocab(vocab)
    d(ids)
    d.set_draft_vocab(None)
    d.set_draft_vocab(other)
    assert torch.allclose(d(ids).logits[..., other], full[..., other], atol=1e-5)
    mine = [7, 8, 9]
    d.set_draft_vocab(mine)
    mine.append(10)  # the caller's list is theirs: the drafter kept a copy
    assert d.draft_vocab.tolist() == [7, 8, 9]


def test_a_narrowed_drafter_stays_lossless_and_drafts_only_its_vocabulary(target, drafters, tokenizer,
                                                                          monkeypatch) -> None:
    """Greedy output stays AR greedy's whatever the drafter may propose; narrowed to the tokens AR
    greedy emits it is still accepted, and narrowed to tokens AR never emits it is never accepted."""
    import diffspec.speculative.ar as ar_mod

    cfg = SpecConfig(gen_length=14, gamma=3)
    ar = ar_generate(target, tokenizer, PROMPTS, cfg)
    emitted = sorted({t for r in ar.raw_ids for t in r})
    unused = [t for t in range(tokenizer.vocab_size) if t not in emitted][:50]
    seen: list[int] = []
    real = ar_mod._draft
    monkeypatch.setattr(ar_mod, "_draft", lambda *a, **k: (lambda out: (seen.extend(out[0]), out)[1])(real(*a, **k)))
    for vocab, accepts in ((emitted, True), (unused, False)):
        d = copy.deepcopy(drafters["near"]).set_draft_vocab(vocab)
        seen.clear()
        spec = spec_generate(target, d, tokenizer, PROMPTS, cfg)
        assert spec.raw_ids == ar.raw_ids
        assert seen and set(seen) <= set(vocab)
        assert (spec.stats["accepted"] > 0) == accepts
    with pytest.raises(ValueError, match="only a drafter may have"):
        spec_generate(copy.deepcopy(target).set_draft_vocab(emitted), drafters["near"], tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="only a drafter may have"):
        ar_generate(copy.deepcopy(target).set_draft_vocab(emitted), tokenizer, PROMPTS, cfg)


# --- gamma="auto": the chain sized on this device ------------------------------------------------


def test_auto_gamma_decodes_as_the_gamma_it_chose_and_reports_it(tokenizer) -> None:
    from diffspec.speculative import sizing

    sizing._CHOSEN.clear()
    # room for the 64-token calibration, and an EOS no answer reaches so it runs all 64
    t = make_qwen(tokenizer, seed=0, max_position_embeddings=160, eos_token_id=tokenizer.vocab_size - 1)
    near = copy.deepcopy(t)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = SpecConfig(gen_length=16, gamma="auto")
    res = spec_generate(t, near, tokenizer, PROMPTS, cfg)
    report = res.stats["auto_gamma"]
    g = report["chosen"]
    assert [c["gamma"] for c in report["candidates"]] == list(range(1, 9)) and g in range(1, 9)
    assert report["calibration_tokens"] == 64 and not report["remembered"] and res.config.gamma == "auto"
    assert len({c["acceptance_length"] for c in report["candidates"]}) > 1  # each candidate drafted its own γ
    assert "estimate" not in report and all(c["seconds"] > 0 for c in report["candidates"])  # γ by γ, timed
    fixed = spec_generate(t, near, tokenizer, PROMPTS, cfg.replace(gamma=g))
    assert res.raw_ids == fixed.raw_ids == ar_generate(t, tokenizer, PROMPTS, cfg).raw_ids
    assert res.meter.nfe == fixed.meter.nfe and res.meter.wall_seconds >= report["calibration_seconds"]
    again = spec_generate(t, copy.deepcopy(near), tokenizer, PROMPTS[:1], cfg)
    assert again.stats["auto_gamma"]["remembered"] and again.stats["auto_gamma"]["chosen"] == g
    narrowed = copy.deepcopy(near).set_draft_vocab(list(range(40)))  # cheaper drafts: measured anew
    assert not spec_generate(t, narrowed, tokenizer, PROMPTS[:1], cfg).stats["auto_gamma"]["remembered"]


def test_auto_gamma_option_parsing_and_errors() -> None:
    from diffspec.api import build_config
    from diffspec.bench.runner import parse_spec

    assert parse_spec("ar-spec:gamma=auto")[1]["gamma"] == "auto"
    assert build_config("ar-spec", gamma="auto").decode.gamma == "auto"
    with pytest.raises(ValueError, match="or 'auto'"):
        SpecConfig(gamma="four")
    with pytest.raises(ValueError, match="dflash and d2sd keep the drafter's block"):
        build_config("dflash", gamma="auto")


# --- speculative, sampling ----------------------------------------------------------------------


def test_sampling_is_seeded_and_self_drafter_accepts_all(target, drafters, tokenizer) -> None:
    cfg = SpecConfig(gen_length=12, gamma=3, temperature=1.0, stop_at_eos=False, seed=3)
    a = spec_generate(target, drafters["near"], tokenizer, PROMPTS, cfg)
    b = spec_generate(target, drafters["near"], tokenizer, PROMPTS, cfg)
    c = spec_generate(target, drafters["near"], tokenizer, PROMPTS, cfg.replace(seed=4))
    assert a.raw_ids == b.raw_ids and a.stats == b.stats
    assert a.raw_ids != c.raw_ids
    assert all(len(r) == 12 for r in a.raw_ids)
    assert a.meter.models["target"].nfe == a.stats["rounds"] + len(PROMPTS)
    same = spec_generate(target, target, tokenizer, PROMPTS, cfg)
    assert same.stats["accepted"] == same.stats["drafted"]  # p == q up to rounding: min(1, p/q) ~ 1
    ar1 = ar_generate(target, tokenizer, PROMPTS, cfg)
    assert ar1.raw_ids == ar_generate(target, tokenizer, PROMPTS, cfg).raw_ids


def test_greedy_accept() -> None:
    logits = torch.full((4, 6), -1.0)
    logits[0, 2] = logits[1, 5] = logits[2, 0] = logits[3, 1] = 1.0  # argmax 2, 5, 0, 1
    assert greedy_accept(logits, [2, 5, 0]) == (3, 1)  # all accepted, bonus from the last row
    assert greedy_accept(logits, [2, 4, 0]) == (1, 5)  # d_2 rejected, corrected to the target's 5
    assert greedy_accept(logits, [3, 5, 0]) == (0, 2)
    assert greedy_accept(logits[:1], []) == (0, 2)


@pytest.mark.parametrize("p, q", [
    ([0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.3, 0.5]),  # q puts mass where p has none
    ([0.05, 0.05, 0.1, 0.8], [0.7, 0.1, 0.1, 0.1]),
    ([0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]),  # identical: always accepted
    ([0.4, 0.3, 0.2, 0.1], [0.5, 0.5, 0.0, 0.0]),  # a drafter narrowed to a draft vocabulary {0, 1}
])
def test_rejection_rule_reproduces_target_distribution(p, q) -> None:
    p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    bonus = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # the row after d_1: never read unless accepted
    g = torch.Generator().manual_seed(0)
    N = 20000
    drafts = torch.multinomial(q, N, replacement=True, generator=g).tolist()
    counts, accepted = torch.zeros(4), 0
    for d in drafts:
        k, token = rejection_accept(torch.stack([p, bonus]), q[None], [d], g)
        emitted = d if k == 1 else token
        counts[emitted] += 1
        accepted += k
        if k == 1:
            assert token == 3  # the bonus comes from p's next row
    assert torch.allclose(counts / N, p.float(), atol=0.015)
    assert accepted / N == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.015)  # P(accept) = Σ min(p, q)


# --- errors -------------------------------------------------------------------------------------


def test_errors(target, tokenizer, tiny_model) -> None:
    cfg = SpecConfig(gen_length=8)
    with pytest.raises(ValueError, match="vocabularies differ"):
        spec_generate(target, make_qwen(tokenizer, vocab_size=tokenizer.vocab_size + 8), tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="eos"):
        spec_generate(target, with_eos(target, 7), tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="not an autoregressive"):
        spec_generate(target, tiny_model, tokenizer, PROMPTS, cfg)  # a LLaDA (unshifted) model
    with pytest.raises(ValueError, match="not an autoregressive"):
        ar_generate(tiny_model, tokenizer, PROMPTS, cfg)
    with pytest.raises(ValueError, match="SpecConfig"):
        spec_generate(target, target, tokenizer, PROMPTS, ARConfig())
    for gen in (lambda ps, c: ar_generate(target, tokenizer, ps, c),
                lambda ps, c: spec_generate(target, target, tokenizer, ps, c)):
        with pytest.raises(ValueError, match="prompt 1 is empty"):
            gen(["1+1", "  "], cfg)
        with pytest.raises(ValueError, match="no prompts"):
            gen([], cfg)
        with pytest.raises(ValueError, match="exceeds the model.s 64 positions"):
            gen(PROMPTS, cfg.replace(gen_length=60))
