"""The vanilla LLaDA sampler (`diffusion_generate` / `decode_canvas` with `DecodeConfig`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffspec.decoding.config import DecodeConfig
from diffspec.decoding.diffusion import decode_canvas, diffusion_generate
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.decoding.policies import num_transfer_tokens
from diffspec.decoding.state import Canvas
from diffspec.models.llada import ModelOutput

PROMPTS = [
    "Question: Tom has 5 pens.\nAnswer:",
    "Question: Ana has 31 cups. Ana doubles them. How many cups does Ana have now?\nAnswer:",
    "Question: Leo has 9 eggs. How many?\nAnswer:",
]


@pytest.fixture(scope="module")
def model(make_model):
    """A tiny random LLaDA with 5x larger weights (std 0.1): sharper, more context-dependent
    predictions than the std-0.02 init, so batching/ordering bugs change the output."""
    m = make_model(seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight") and "ln_f" not in name:
                p.mul_(5.0)
    return m


def cfg(**kw) -> DecodeConfig:
    return DecodeConfig(**{"gen_length": 16, "block_length": 8, "steps": 8, **kw})


class Recorder(nn.Module):
    """Wraps a model: records every input canvas and can bias chosen logits."""

    def __init__(self, model: nn.Module, bias: dict[int, float] | None = None, max_calls: int = 1000):
        super().__init__()
        self.inner, self.config, self.bias = model, model.config, bias or {}
        self.inputs: list[torch.Tensor] = []
        self.max_calls = max_calls  # fail instead of hanging if the decoder never terminates

    def forward_flops(self, n_query: int, n_keys: int) -> float:
        return self.inner.forward_flops(n_query, n_keys)

    def forward(self, input_ids, **kw):
        if len(self.inputs) >= self.max_calls:
            raise RuntimeError(f"decoder made more than {self.max_calls} model calls")
        self.inputs.append(input_ids.clone())
        out = self.inner(input_ids, **kw)
        logits = out.logits.clone()
        for tok, b in self.bias.items():
            logits[..., tok] += b
        return ModelOutput(logits=logits)


# ---------------------------------------------------------------- reference (LLaDA generate.py)

def llada_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """`get_num_transfer_tokens` from ML-GSAI/LLaDA generate.py."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, : remainder[i]] += 1
    return out


@torch.no_grad()
def llada_generate_greedy(model, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int,
                          logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
                          eos_id: int = -1, eot_id: int = -1):
    """LLaDA's reference `generate` (temperature 0, low_confidence, no CFG), one prompt.

    One deliberate difference, matching diffspec: the mask token is never proposed.
    The EOS options follow its code at temperature 0, where `logits_with_noise` *is*
    `logits`, so its chained assignment makes both EOS and EoT impossible in the
    softmax that scores confidence (after the argmax picked the candidates).
    (At temperature > 0 its `logits_with_noise` is a separate tensor and only EoT is
    excluded there; diffspec excludes both, as its docstring says it means to.)
    """
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for nb in range(num_blocks):
        lo = prompt.shape[1] + nb * block_length
        ntt = llada_num_transfer_tokens(x[:, lo : lo + block_length] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x).logits
            logits[..., mask_id] = -torch.inf
            if logits_eos_inf:
                logits[..., eos_id] = -torch.inf
            x0 = logits.argmax(-1)
            if confidence_eos_eot_inf:
                logits[..., eos_id] = logits[..., eot_id] = -torch.inf
            p = F.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            x0_p[:, lo + block_length :] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            # torch.topk leaves the order of equal confidences unspecified; diffspec takes the
            # leftmost (a stable sort), which matters once EOS cells all score 0.
            idx = confidence[0].argsort(descending=True, stable=True)[: int(ntt[0, i])]
            x[0, idx] = x0[0, idx]
    return x[0, prompt.shape[1] :].tolist()


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("n, steps", [(8, 8), (8, 3), (16, 5), (7, 7), (32, 1), (5, 2), (100, 7)])
def test_num_transfer_tokens_matches_llada(n, steps):
    ours = num_transfer_tokens(n, steps)
    ref = llada_num_transfer_tokens(torch.ones(1, n, dtype=torch.bool), steps)[0].tolist()
    assert ours == ref
    assert sum(ours) == n and len(ours) == steps
    assert ours[0] == n // steps + (1 if n % steps else 0)


def test_matches_llada_reference_greedy(model, tokenizer):
    for gen_length, block_length, steps in [(16, 8, 8), (16, 16, 5), (24, 8, 6)]:
        c = cfg(gen_length=gen_length, block_length=block_length, steps=steps)
        for prompt in PROMPTS[:2]:
            ours = diffusion_generate(model, tokenizer, [prompt], c).raw_ids[0]
            ids = torch.tensor([tokenizer.encode(prompt)])
            ref = llada_generate_greedy(model, ids, steps, gen_length, block_length, model.config.mask_token_id)
            assert ours == ref, (gen_length, block_length, steps, prompt)


@pytest.mark.parametrize("logits_eos_inf, confidence_eos_eot_inf", [(False, False), (True, False), (False, True),
                                                                    (True, True)])
def test_eos_options_match_llada_reference(make_model, tokenizer, logits_eos_inf, confidence_eos_eot_inf):
    """LLaDA's `logits_eos_inf` / `confidence_eos_eot_inf`, step for step against its sampler.

    EOS and EoT get a large logit bias, so they are the argmax at many cells: each
    option then changes the output, which the last assertion checks.
    """
    eot = tokenizer.token_to_id("=")  # any ordinary id can play <|eot_id|> in a tiny model
    base = make_model(seed=3, eot_token_id=eot)
    with torch.no_grad():  # sharper predictions, as in the `model` fixture
        for name, p in base.named_parameters():
            if not name.endswith("norm.weight") and "ln_f" not in name:
                p.mul_(5.0)
    eos = base.config.eos_token_id
    biased = Recorder(base, bias={eos: 2.5, eot: 2.25})  # EOS / EoT win at some cells, not all
    c = cfg(gen_length=16, block_length=8, steps=16, logits_eos_inf=logits_eos_inf,
            confidence_eos_eot_inf=confidence_eos_eot_inf)
    plain = diffusion_generate(biased, tokenizer, [PROMPTS[0]], cfg(gen_length=16, block_length=8, steps=16)).raw_ids[0]
    for prompt in PROMPTS[:2]:
        ours = diffusion_generate(biased, tokenizer, [prompt], c).raw_ids[0]
        ids = torch.tensor([tokenizer.encode(prompt)])
        ref = llada_generate_greedy(biased, ids, 16, 16, 8, base.config.mask_token_id, logits_eos_inf,
                                    confidence_eos_eot_inf, eos, eot)
        assert ours == ref, prompt
        if logits_eos_inf:
            assert eos not in ours
    if logits_eos_inf or confidence_eos_eot_inf:
        assert diffusion_generate(biased, tokenizer, [PROMPTS[0]], c).raw_ids[0] != plain


def test_eos_options_are_refused_where_they_do_nothing():
    assert DecodeConfig(remasking="random").unused_options(["confidence_eos_eot_inf"]) == ["confidence_eos_eot_inf"]
    with pytest.raises(ValueError, match="logits_eos_inf must be a bool"):
        DecodeConfig(logits_eos_inf="yes")


def test_canvas_evolves_block_by_block(model, tokenizer):
    """Each forward sees earlier blocks complete, later blocks fully masked, and the
    current block losing exactly the linear schedule's number of masks per step."""
    c = cfg(gen_length=24, block_length=8, steps=9)
    rec = Recorder(model)
    res = diffusion_generate(rec, tokenizer, PROMPTS[:2], c)
    mask_id = model.config.mask_token_id
    P = rec.inputs[0].shape[1] - c.gen_length
    per_block = c.steps // c.num_blocks
    plan = num_transfer_tokens(c.block_length, per_block)
    assert len(rec.inputs) == c.steps
    for call, x in enumerate(rec.inputs):
        b, step = divmod(call, per_block)
        s, e = P + b * c.block_length, P + (b + 1) * c.block_length
        masked = x == mask_id
        assert not masked[:, :s].any()
        assert masked[:, e:].all()
        assert (masked[:, s:e].sum(1) == c.block_length - sum(plan[:step])).all()
    assert all(mask_id not in row for row in res.raw_ids)


# ---------------------------------------------------------------- NFE / meter

@pytest.mark.parametrize("gen_length, block_length, steps", [(16, 8, 8), (16, 8, 2), (16, 16, 16), (16, 4, 4), (12, 12, 5)])
def test_nfe_equals_steps(model, tokenizer, gen_length, block_length, steps):
    c = cfg(gen_length=gen_length, block_length=block_length, steps=steps)
    res = diffusion_generate(model, tokenizer, PROMPTS, c)
    assert res.meter.nfe == steps  # one batched forward per step
    assert res.meter.models["model"].sequence_forwards == steps * len(PROMPTS)
    assert res.meter.tokens_generated == gen_length * len(PROMPTS)
    assert res.meter.tokens_per_forward == pytest.approx(gen_length / steps)
    assert res.summary()["nfe_per_sequence"] == pytest.approx(steps)
    assert all(len(r) == gen_length for r in res.raw_ids)


def test_nfe_with_cfg_is_twice_steps(model, tokenizer):
    res = diffusion_generate(model, tokenizer, PROMPTS[:2], cfg(cfg_scale=1.5))
    assert res.meter.nfe == 2 * 8
    assert all(model.config.mask_token_id not in r for r in res.raw_ids)
    plain = diffusion_generate(model, tokenizer, PROMPTS[:2], cfg())
    assert plain.meter.nfe == 8


def test_cfg_unconditional_pass_masks_prompt_only(model, tokenizer):
    rec = Recorder(model)
    diffusion_generate(rec, tokenizer, PROMPTS[:2], cfg(cfg_scale=1.0, steps=2, block_length=16))
    mask_id, pad_id = model.config.mask_token_id, model.config.pad_token_id
    cond, uncond = rec.inputs[0], rec.inputs[1]
    P = cond.shape[1] - 16
    assert torch.equal(cond[:, P:], uncond[:, P:])
    real = cond[:, :P] != pad_id  # prompt tokens (left padding stays padding)
    assert (uncond[:, :P][real] == mask_id).all()
    assert (uncond[:, :P][~real] == pad_id).all()


def test_batches_are_split_by_batch_size(model, tokenizer):
    res = diffusion_generate(model, tokenizer, PROMPTS, cfg(batch_size=2))
    assert res.meter.nfe == 2 * 8  # two batches
    assert res.meter.models["model"].max_batch == 2
    assert res.meter.tokens_per_forward == pytest.approx(16 / 8)
    assert res.meter.sequences == 3


def test_meter_accumulates_and_flops(model, tokenizer):
    meter = CostMeter()
    diffusion_generate(model, tokenizer, PROMPTS[:1], cfg(), meter=meter)
    diffusion_generate(model, tokenizer, PROMPTS[:1], cfg(), meter=meter)
    assert meter.nfe == 16 and meter.sequences == 2
    T = len(tokenizer.encode(PROMPTS[0])) + 16
    assert meter.flops == pytest.approx(16 * model.forward_flops(T, T))
    assert meter.tokens_processed == 16 * T


# ---------------------------------------------------------------- determinism / batching

def test_same_seed_same_output_with_temperature(model, tokenizer):
    c = cfg(temperature=1.0, seed=3)
    a = diffusion_generate(model, tokenizer, PROMPTS, c)
    b = diffusion_generate(model, tokenizer, PROMPTS, c)
    assert a.raw_ids == b.raw_ids and a.texts == b.texts
    d = diffusion_generate(model, tokenizer, PROMPTS, c.replace(seed=4))
    assert d.raw_ids != a.raw_ids
    greedy = diffusion_generate(model, tokenizer, PROMPTS, c.replace(temperature=0.0))
    assert greedy.raw_ids != a.raw_ids


def test_greedy_ignores_seed(model, tokenizer):
    a = diffusion_generate(model, tokenizer, PROMPTS, cfg(seed=0))
    b = diffusion_generate(model, tokenizer, PROMPTS, cfg(seed=99))
    assert a.raw_ids == b.raw_ids


@pytest.mark.parametrize("block_length, steps", [(8, 8), (16, 4)])
def test_batch_matches_single_prompts(model, tokenizer, block_length, steps):
    c = cfg(block_length=block_length, steps=steps)
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # really different lengths
    batched = diffusion_generate(model, tokenizer, PROMPTS, c)
    for i, p in enumerate(PROMPTS):
        alone = diffusion_generate(model, tokenizer, [p], c)
        assert batched.raw_ids[i] == alone.raw_ids[0]
        assert batched.token_ids[i] == alone.token_ids[0]
        assert batched.texts[i] == alone.texts[0]


def test_random_remasking(model, tokenizer):
    c = cfg(remasking="random", seed=5)
    a = diffusion_generate(model, tokenizer, PROMPTS, c)
    assert a.meter.nfe == 8
    assert all(len(r) == 16 and model.config.mask_token_id not in r for r in a.raw_ids)
    assert diffusion_generate(model, tokenizer, PROMPTS, c).raw_ids == a.raw_ids
    # commit order is random, so a different seed (very likely) changes what is committed when
    orders = set()
    for seed in range(4):
        rec = Recorder(model)
        diffusion_generate(rec, tokenizer, PROMPTS[:1], c.replace(seed=seed))
        orders.add(tuple(tuple((x == model.config.mask_token_id)[0].tolist()) for x in rec.inputs))
    assert len(orders) > 1


def test_random_remasking_with_temperature(model, tokenizer):
    res = diffusion_generate(model, tokenizer, PROMPTS, cfg(remasking="random", temperature=0.7))
    assert res.meter.nfe == 8
    assert all(model.config.mask_token_id not in r for r in res.raw_ids)


# ---------------------------------------------------------------- robustness

def test_model_that_prefers_the_mask_token_terminates(model, tokenizer):
    """Regression: a model whose argmax is the mask token used to loop forever."""
    mask_id = model.config.mask_token_id
    for c in (cfg(), cfg(temperature=1.0), cfg(cfg_scale=1.0)):
        rec = Recorder(model, bias={mask_id: 100.0}, max_calls=4 * c.steps)
        res = diffusion_generate(rec, tokenizer, PROMPTS[:2], c)
        assert len(rec.inputs) == c.steps * (2 if c.cfg_scale else 1)
        assert all(mask_id not in r for r in res.raw_ids)


def test_eos_cut(model, tokenizer):
    eos = model.config.eos_token_id
    rec = Recorder(model, bias={eos: 100.0})
    res = diffusion_generate(rec, tokenizer, PROMPTS[:2], cfg())
    assert res.raw_ids == [[eos] * 16] * 2
    assert res.token_ids == [[], []] and res.texts == ["", ""]


def test_decode_canvas_directly(model, tokenizer):
    mcfg = model.config
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    canvas = Canvas.from_prompts(prompts, 16, mcfg.mask_token_id, mcfg.pad_token_id, mcfg.max_sequence_length)
    before = canvas.x[:, : canvas.prompt_len].clone()
    meter = CostMeter()
    with torch.no_grad():
        decode_canvas(MeteredModel(model, meter), canvas, cfg(), torch.Generator().manual_seed(0))
    assert torch.equal(canvas.x[:, : canvas.prompt_len], before)
    assert not canvas.masked().any()
    assert meter.nfe == 8
    pad = canvas.prompt_len - len(prompts[1])
    assert not canvas.attention_mask[1, :pad].any() and canvas.attention_mask[1, pad:].all()


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(gen_length=20, block_length=8), "multiple of block_length"),
        (dict(gen_length=16, block_length=8, steps=3), "multiple of the number of blocks"),
        (dict(steps=0), r"steps must be in \[1, gen_length"),
        (dict(steps=17), r"steps must be in \[1, gen_length"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(remasking="lowest"), "unknown remasking 'lowest'.*low_confidence"),
        (dict(gen_length=0), "gen_length must be >= 1"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


@pytest.mark.parametrize("prompts", [[""], ["   "], [PROMPTS[0], ""], []])
def test_empty_prompt(model, tokenizer, prompts):
    with pytest.raises(ValueError, match="empty|no prompts"):
        diffusion_generate(model, tokenizer, prompts, cfg())


def test_prompt_too_long(model, tokenizer):
    long_prompt = "Question: " + "Tom has 5 pens. " * 40 + "\nAnswer:"
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        diffusion_generate(model, tokenizer, [long_prompt], cfg())
    # fits without generation budget only if gen_length is small enough
    n = len(tokenizer.encode(PROMPTS[1]))
    with pytest.raises(ValueError, match="max_sequence_length"):
        diffusion_generate(model, tokenizer, [PROMPTS[1]], cfg(gen_length=128 - n + 1, block_length=128 - n + 1))
    res = diffusion_generate(model, tokenizer, [PROMPTS[1]], cfg(gen_length=128 - n, block_length=128 - n,
                                                                       steps=4))
    assert len(res.raw_ids[0]) == 128 - n


def test_prompt_with_mask_token(model, tokenizer):
    with pytest.raises(ValueError, match="mask token"):
        diffusion_generate(model, tokenizer, ["Tom <|mdm_mask|> 5"], cfg())


def test_string_prompt_is_one_prompt(model, tokenizer):
    res = diffusion_generate(model, tokenizer, PROMPTS[0], cfg())
    assert len(res.texts) == 1
