"""Every masked-diffusion method on Dream's shifted logits.

A one-layer network makes every cache exact: each cell's keys and values come from its own
token alone, so a cache that reuses K/V of unchanged cells must decode exactly what the uncached
loop decodes. On a shifted network (Dream: cell i is scored from the output at i - 1) that only
holds if the cache also feeds the column before each scored cell and shifts over canvas
columns; shifting inside the fed slice (what the model's own forward does) scores the first
fed cell from itself and changes the output.
"""
import pytest
import torch

from diffspec.api import generate
from diffspec.decoding.config import DecodeConfig
from diffspec.decoding.diffusion import diffusion_generate
from diffspec.models.dream import save_dream
from diffspec.speculative.dualdiffusion import build_dual_config, dualdiffusion_generate
from diffspec.speculative.psd import build_psd_config, psd_generate

from test_dream import random_dream, tiny_config

PROMPTS = ["Question: 12+7=", "Question: what is 3 * 45?\nAnswer:", "7"]


@pytest.fixture(scope="module")
def dream1(tokenizer):
    return random_dream(tiny_config(tokenizer, num_hidden_layers=1), seed=5)


@pytest.fixture(scope="module")
def dream2(tokenizer):
    return random_dream(tiny_config(tokenizer), seed=6)


def cfg(**kw) -> DecodeConfig:
    base = dict(gen_length=16, block_length=8, steps=16, batch_size=3)
    return DecodeConfig(**{**base, **kw})


@pytest.mark.parametrize("cache", ["prefix", "dual", "dkv-decode", "dkv-prefill"])
@pytest.mark.parametrize("policy", ["schedule", "threshold"])
def test_exact_caches_on_a_one_layer_dream_equal_the_uncached_loop(dream1, tokenizer, cache, policy):
    opts = {"threshold": 0.2} if policy == "threshold" else {}
    ref = diffusion_generate(dream1, tokenizer, PROMPTS, cfg(policy=policy, **opts))
    out = diffusion_generate(dream1, tokenizer, PROMPTS, cfg(policy=policy, cache=cache, **opts))
    assert out.raw_ids == ref.raw_ids
    assert out.meter.tokens_processed < ref.meter.tokens_processed  # and it did cache


def test_dual_cache_on_a_deeper_dream_stays_close_and_decodes_everything(dream2, tokenizer):
    ref = diffusion_generate(dream2, tokenizer, PROMPTS, cfg())
    out = diffusion_generate(dream2, tokenizer, PROMPTS, cfg(cache="dual"))
    mask = dream2.config.mask_token_id
    assert all(mask not in r for r in out.raw_ids)
    same = sum(a == b for ra, rb in zip(out.raw_ids, ref.raw_ids) for a, b in zip(ra, rb))
    assert same >= 0.5 * sum(len(r) for r in ref.raw_ids)  # an approximation, not another decoder


def test_psd_lossless_on_dream_equals_one_token_greedy(dream2, tokenizer):
    greedy = diffusion_generate(dream2, tokenizer, PROMPTS, cfg())  # steps = gen_length: one token a step
    psd = psd_generate(dream2, tokenizer, PROMPTS, build_psd_config(cfg(), lossless=True))
    assert psd.raw_ids == greedy.raw_ids
    assert psd.stats["accepted"] > 0  # drafts were accepted, so it did more than one token a forward


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_psd_cached_verification_on_a_one_layer_dream_is_exact(dream1, tokenizer, cache):
    base = cfg(policy="threshold", threshold=0.2)
    ref = psd_generate(dream1, tokenizer, PROMPTS, build_psd_config(base))
    out = psd_generate(dream1, tokenizer, PROMPTS, build_psd_config(base.replace(cache=cache)))
    assert out.raw_ids == ref.raw_ids


def test_dualdiffusion_on_dream_with_a_cached_self_drafter_is_exact_on_one_layer(dream1, tokenizer):
    none = build_dual_config(cfg(), rule="exact_match", drafter_cache="none", drafter_policy="threshold",
                             drafter_threshold=0.2, num_drafter_steps=2)
    dual = none.replace(decode=none.decode.replace(cache="dual"))
    a = dualdiffusion_generate(dream1, tokenizer, PROMPTS, none)
    b = dualdiffusion_generate(dream1, tokenizer, PROMPTS, dual)
    assert a.raw_ids == b.raw_ids
    assert a.stats["drafted"] > 0 and dream1.config.mask_token_id not in sum(a.raw_ids, [])


def test_every_method_runs_on_a_dream_directory(dream2, tokenizer, tmp_path):
    path = save_dream(dream2, tokenizer, tmp_path / "dream")
    common = dict(gen_length=16, block_length=8, steps=16)
    for method, opts in [("vanilla", {}), ("fast-dllm", {"cache": "dual", "policy": "threshold"}),
                         ("dkv-cache", {"cache": "dkv-decode"}), ("psd", {}), ("dualdiffusion", {}),
                         ("dream", {})]:
        kw = dict(common) if method != "dream" else {"gen_length": 16, "steps": 16}
        res = generate(PROMPTS[:2], model=str(path), method=method, **kw, **opts)
        assert len(res.token_ids) == 2, method
        assert dream2.config.mask_token_id not in sum(res.raw_ids, []), method


def test_cli_generate_fast_dllm_dual_on_a_dream_directory(dream2, tokenizer, tmp_path, capsys):
    from diffspec.cli import main

    path = save_dream(dream2, tokenizer, tmp_path / "dream")
    rc = main(["generate", "--model", str(path), "--method", "fast-dllm", "--cache", "dual", "--prompt", "12+7=",
               "--gen-length", "16", "--block-length", "8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "[fast-dllm] forwards" in err
    want = generate(["12+7="], model=str(path), method="fast-dllm", cache="dual", gen_length=16,
                    block_length=8).texts[0]
    assert out == want + "\n"
