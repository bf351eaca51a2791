"""diffspec.evaluation.likelihood: exact AR log-likelihoods (parity with transformers' Qwen3ForCausalLM) and
LLaDA's Monte-Carlo ELBO for masked diffusion models (deterministic, unbiased, variance falling with
mc_num), plus `diffspec eval --scoring likelihood`."""
from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from diffspec.cli import main
from diffspec.decoding.meter import CostMeter
from diffspec.evaluation.likelihood import (ar_loglikelihood, ar_loglikelihood_rolling, encode_pair, loglikelihood,
                                 mask_draws, mc_loglikelihood, request_seed, rolling_windows)
from diffspec.models.causal import Qwen3Config, Qwen3Model
from diffspec.models.checkpoint import save_model

QWEN_TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=40, eos_token_id=0)


def tiny_qwen(seed: int = 0) -> Qwen3Model:
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**QWEN_TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p)) if name.endswith("norm.weight") else p.normal_(0.0, 0.15)
    return model


def ids(n: int, seed: int, low: int = 2, high: int = 96) -> list[int]:
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- AR: exact, parity with transformers


def test_ar_loglikelihood_equals_transformers_qwen3() -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip("this transformers has no Qwen3")
    ours = tiny_qwen()
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**ours.config.to_hf_dict())).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)  # tied head
    pairs = [(ids(7, 1), ids(3, 2)), (ids(12, 3), ids(1, 4)), ([], ids(5, 5)), (ids(2, 6), ids(9, 7))]

    def reference(ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        full = torch.tensor([(ctx or [0]) + cont])  # empty context: conditioned on EOS (no BOS in the config)
        with torch.no_grad():
            lp = hf(full).logits[0, :-1].float().log_softmax(-1)[-len(cont):]
        target = torch.tensor(cont)
        return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())

    want = [reference(c, t) for c, t in pairs]
    for batch_size in (1, 3, 8):  # right-padded batches of different shapes
        got = ar_loglikelihood(ours, pairs, batch_size=batch_size)
        for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert greedy == ref_greedy
    # a continuation made of the model's own argmax tokens is greedy
    ctx = ids(6, 8)
    with torch.no_grad():
        g = []
        for _ in range(4):
            g.append(int(hf(torch.tensor([ctx + g])).logits[0, -1].argmax()))
    (lp, greedy), = ar_loglikelihood(ours, [(ctx, g)])
    assert greedy and lp == pytest.approx(reference(ctx, g)[0], abs=1e-4)


def test_ar_truncates_long_contexts_and_meters() -> None:
    model, meter = tiny_qwen(), CostMeter()
    ctx, cont = ids(60, 1), ids(4, 2)  # 64 tokens > 40 positions: the context keeps its end
    (long_lp, _), = ar_loglikelihood(model, [(ctx, cont)], meter=meter)
    (cut_lp, _), = ar_loglikelihood(model, [(ctx[-37:], cont)])
    assert long_lp == pytest.approx(cut_lp, abs=1e-5)
    assert meter.nfe == 1 and meter.sequences == 1 and meter.flops > 0
    with pytest.raises(ValueError, match="empty continuation"):
        ar_loglikelihood(model, [(ctx, [])])


def test_rolling_windows_predict_every_token_once_and_match_one_window() -> None:
    toks = ids(100, 3)
    windows = rolling_windows(toks, 0, 40)
    assert list(itertools.chain.from_iterable(c for _, c in windows)) == toks
    assert all(len(c) + len(x) - 1 <= 40 for x, c in windows)  # each input fits the positions
    lm_utils = pytest.importorskip("lm_eval.utils")
    ref = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(toks, 0, 40, 1)]
    assert [(list(a), list(b)) for a, b in ref] == windows
    model = tiny_qwen()
    short = ids(30, 4)  # fits one window: the rolling total is the sum over all tokens after the prefix
    (total,) = ar_loglikelihood_rolling(model, [short])
    (lp, _), = ar_loglikelihood(model, [([], short)])
    assert total == pytest.approx(lp, abs=1e-5)


# ---------------------------------------------------------------- masked diffusion: Monte-Carlo ELBO


@pytest.fixture(scope="module")
def llada(make_model):
    return make_model(seed=3)


def exact_elbo(model, ctx: list[int], cont: list[int]) -> float:
    """The ELBO's expectation by enumeration: k uniform in 1..L, then every k-subset equally likely."""
    mask_id, L = model.config.mask_token_id, len(cont)
    total = 0.0
    for k in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), k))
        acc = 0.0
        for s in subsets:
            x = torch.tensor([ctx + [mask_id if j in s else t for j, t in enumerate(cont)]])
            with torch.no_grad():
                logits = model(x).logits[0, len(ctx):]
            ce = F.cross_entropy(logits[list(s)].float(), torch.tensor([cont[j] for j in s]), reduction="sum")
            acc += float(ce) / (k / L)
        total += acc / len(subsets) / L
    return -total


def test_mc_elbo_is_deterministic_for_a_seed_whatever_the_batching(llada) -> None:
    pairs = [(ids(9, 1, high=290), ids(5, 2, high=290)), (ids(4, 3, high=290), ids(3, 4, high=290)),
             (ids(14, 5, high=290), ids(1, 6, high=290))]
    a = mc_loglikelihood(llada, pairs, mc_num=8, batch_size=4, seed=11)
    b = mc_loglikelihood(llada, pairs, mc_num=8, batch_size=4, seed=11)
    assert a == b  # same seed, same draws, same numbers
    c = mc_loglikelihood(llada, pairs[::-1], mc_num=8, batch_size=3, seed=11)[::-1]
    for (x, gx), (y, gy) in zip(a, c):  # per-request generators: order and batch size change nothing
        assert x == pytest.approx(y, abs=1e-5) and gx == gy
    d = mc_loglikelihood(llada, pairs, mc_num=8, batch_size=4, seed=12)
    assert d[0][0] != a[0][0]  # another seed, other draws
    assert d[2][0] == pytest.approx(a[2][0], abs=1e-6)  # one token: exact, no randomness at all


def test_mc_elbo_is_unbiased_and_its_variance_falls_with_mc_num(llada) -> None:
    ctx, cont = ids(6, 7, high=290), ids(3, 8, high=290)
    exact = exact_elbo(llada, ctx, cont)

    def estimates(mc_num: int, n: int = 24) -> list[float]:
        return [mc_loglikelihood(llada, [(ctx, cont)], mc_num=mc_num, batch_size=64, seed=s, check_greedy=False)[0][0]
                for s in range(n)]

    one, many = estimates(1), estimates(16)
    assert statistics.pvariance(many) < statistics.pvariance(one) / 4
    sd = math.sqrt(statistics.pvariance(one) / len(one))
    assert statistics.fmean(one) == pytest.approx(exact, abs=4 * sd + 1e-3)  # unbiased
    assert statistics.fmean(many) == pytest.approx(exact, abs=max(0.05 * abs(exact), 4 * sd / 4))


def test_mask_draws_follow_llada_forward_process() -> None:
    g = torch.Generator().manual_seed(0)
    for L, m in [(1, 4), (5, 1), (7, 16), (3, 3)]:
        masks, ratios = mask_draws(L, m, g)
        counts = masks.sum(-1)
        assert masks.shape == (m, L) and bool((counts >= 1).all()) and bool((counts <= L).all())
        assert torch.allclose(ratios, counts.double() / L)
    masks, _ = mask_draws(4, 4, g)  # m = L: one draw of every count 1..L (stratified)
    assert sorted(masks.sum(-1).tolist()) == [1, 2, 3, 4]
    assert request_seed(0, [1, 2], [3]) != request_seed(0, [1], [2, 3]) != request_seed(1, [1, 2], [3])


def test_single_token_continuation_is_exact_cross_entropy(llada) -> None:
    ctx, tok = ids(8, 9, high=290), ids(1, 10, high=290)
    mask_id = llada.config.mask_token_id
    with torch.no_grad():
        logits = llada(torch.tensor([ctx + [mask_id]])).logits[0, -1].float()
    want = float(logits.log_softmax(-1)[tok[0]])
    logits[mask_id] = -torch.inf
    best = int(logits.argmax())
    meter = CostMeter()
    (lp, greedy), (_, greedy_best) = mc_loglikelihood(llada, [(ctx, tok), (ctx, [best])], mc_num=128, meter=meter)
    assert lp == pytest.approx(want, abs=1e-5) and greedy == (tok[0] == best) and greedy_best
    assert meter.nfe == 1  # one forward for both requests, whatever mc_num


def llada_greedy(model, ctx: list[int], L: int) -> list[int]:
    """LLaDA's suffix_greedy_prediction, one row at a time (the mask token never proposed)."""
    mask_id = model.config.mask_token_id
    x = torch.tensor([ctx + [mask_id] * L])
    for _ in range(L):
        m = x == mask_id
        with torch.no_grad():
            logits = model(x).logits[m].float()
        logits[:, mask_id] = -torch.inf
        conf, tok = logits.softmax(-1).max(-1)
        pos = m.nonzero()[int(conf.argmax())]
        x[0, pos[1]] = tok[int(conf.argmax())]
    return x[0, len(ctx):].tolist()


def test_is_greedy_is_llada_greedy_fill(llada) -> None:
    reqs = [(ids(5, 11, high=290), 4), (ids(9, 12, high=290), 2), (ids(3, 13, high=290), 6)]
    fills = [llada_greedy(llada, c, L) for c, L in reqs]
    pairs = [(c, f) for (c, _), f in zip(reqs, fills)]
    wrong = [(c, f[:-1] + [3 if f[-1] != 3 else 4]) for c, f in pairs]
    got = mc_loglikelihood(llada, pairs + wrong, mc_num=2, batch_size=3)
    assert [g for _, g in got] == [True] * 3 + [False] * 3
    assert [g for _, g in mc_loglikelihood(llada, pairs, mc_num=2, check_greedy=False)] == [False] * 3


def test_cfg_guidance_is_llada_formula(llada) -> None:
    ctx, tok = ids(6, 14, high=290), ids(1, 15, high=290)
    mask_id = llada.config.mask_token_id
    with torch.no_grad():
        cond = llada(torch.tensor([ctx + [mask_id]])).logits[0, -1]
        un = llada(torch.tensor([[mask_id] * len(ctx) + [mask_id]])).logits[0, -1]
    want = float((un + 3.0 * (cond - un)).float().log_softmax(-1)[tok[0]])
    (lp, _), = mc_loglikelihood(llada, [(ctx, tok)], cfg_scale=2.0)
    assert lp == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="mc_num"):
        mc_loglikelihood(llada, [(ctx, tok)], mc_num=0)


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer) -> None:
    ctx, cont = encode_pair(tokenizer, "Question: Tom has 5 apples.\nAnswer: ", "12")
    assert tokenizer.decode(ctx) == "Question: Tom has 5 apples.\nAnswer:"
    assert tokenizer.decode(cont) == " 12"


def test_loglikelihood_dispatches_by_family(llada) -> None:
    qwen, pair = tiny_qwen(), [(ids(5, 16), ids(2, 17))]
    assert loglikelihood(qwen, pair) == ar_loglikelihood(qwen, pair)
    assert loglikelihood(llada, pair, mc_num=4, seed=3) == mc_loglikelihood(llada, pair, mc_num=4, seed=3)


# ---------------------------------------------------------------- diffspec eval --scoring likelihood


@pytest.mark.parametrize("method", ["vanilla", "ar"])
def test_eval_likelihood_scoring_both_families(method, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = main(["eval", "--task", "arith-mc", "--scoring", "likelihood", "--limit", "6", "--method", method,
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    r = json.loads(out.read_text())
    assert r["scoring"] == "likelihood" and r["n"] == 6 and 0.0 <= r["accuracy"] <= 1.0
    assert r["nfe"] >= 1 and r["flops"] > 0 and "likelihood" in captured.out
    s = r["samples"][0]
    assert len(s["loglikelihoods"]) == 4 and s["pred"] == "ABCD"[max(range(4), key=s["loglikelihoods"].__getitem__)]
    assert r["accuracy"] == sum(x["correct"] for x in r["samples"]) / 6


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--task", "arith", "--scoring", "likelihood"], "multiple-choice task"),
    (["eval", "--task", "mmlu", "--scoring", "perplexity"], "unknown --scoring"),
    (["eval", "--task", "arith-mc", "--mc-num", "4"], "--mc-num only applies"),
])
def test_eval_scoring_errors(argv, needle, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffspec: error:") and needle in err and len(err.splitlines()) == 1


def test_eval_likelihood_on_a_checkpoint(make_model, tokenizer, tmp_path, capsys) -> None:
    ckpt = save_model(make_model(max_sequence_length=512), tokenizer, tmp_path / "long")
    rc = main(["eval", "--task", "arith-mc", "--scoring", "likelihood", "--limit", "3", "--model", str(ckpt),
               "--mc-num", "2", "--out", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["mc_num"] == 2
