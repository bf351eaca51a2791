"""Dream: logit parity with transformers' Qwen2Model (bidirectional), the shift, the loader,
and Dream's sampler against a straightforward reference loop written here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffspec.decoding.dream import ALGS, DreamDecodeConfig, dream_decode_canvas, dream_generate, dream_positions
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.decoding.state import Canvas
from diffspec.models.checkpoint import CheckpointError
from diffspec.models.dream import (DreamConfig, DreamModel, iter_safetensors, load_dream, read_safetensors_headers,
                                   save_dream, shift_logits)
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN
from test_real_configs import DREAM_7B  # Dream-v0-Instruct-7B's config.json, kept once

TOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tokenizer, **kw) -> DreamConfig:
    base = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                max_position_embeddings=128, mask_token_id=tokenizer.token_to_id(MASK_TOKEN),
                eos_token_id=tokenizer.token_to_id(EOS_TOKEN))
    return DreamConfig(**{**base, **kw})


def random_dream(cfg: DreamConfig, seed: int = 0) -> DreamModel:
    """A tiny Dream with every weight random, biases and norms included (zero biases would test nothing)."""
    torch.manual_seed(seed)
    model = DreamModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def dream(tokenizer) -> DreamModel:
    return random_dream(tiny_config(tokenizer), seed=3)


# ------------------------------------------------------------------ parity with transformers

def qwen2_from_checkpoint(path: Path, cfg: DreamConfig):
    transformers = pytest.importorskip("transformers")
    qcfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu", tie_word_embeddings=False,
        use_sliding_window=False)
    qcfg._attn_implementation = "eager"
    state = {}
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    for f in files:
        state.update(load_file(str(path / f)))
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    head.weight.data.copy_(state.pop("lm_head.weight"))
    body = {k[len("model."):]: v for k, v in state.items()}
    qwen = transformers.Qwen2Model(qcfg).float().eval()
    missing, unexpected = qwen.load_state_dict(body, strict=False)
    assert not [k for k in missing if "rotary" not in k], missing
    assert not unexpected, unexpected
    return qwen, head.eval()


def bidirectional_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) keys to attend -> (B, 1, T, T) additive mask with no causal triangle."""
    B, T = keep.shape
    return torch.zeros(B, 1, T, T).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)


@torch.no_grad()
def qwen2_raw_logits(qwen, head, ids, keep=None, positions=None):
    keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep
    h = qwen(input_ids=ids, attention_mask=bidirectional_mask(keep), position_ids=positions).last_hidden_state
    return head(h)


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def parity_pair(request, tokenizer, tmp_path_factory):
    model = random_dream(tiny_config(tokenizer, num_key_value_heads=request.param), seed=11)
    path = save_dream(model, tokenizer, tmp_path_factory.mktemp("dream") / "ckpt", max_shard_bytes=60_000)
    assert (path / "model.safetensors.index.json").is_file()  # the parity runs through a sharded load
    loaded, _ = load_dream(path, dtype="float32")
    qwen, head = qwen2_from_checkpoint(path, model.config)
    return loaded, qwen, head


def test_parity_with_qwen2_bidirectional_and_shift(parity_pair):
    model, qwen, head = parity_pair
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        raw = model(ids, shift=False).logits
    ref_raw = qwen2_raw_logits(qwen, head, ids)
    ref = torch.cat([ref_raw[:, :1], ref_raw[:, :-1]], dim=1)  # Dream's shift, written out
    assert ours.shape == ref.shape == (2, 21, model.config.vocab_size)
    assert (raw - ref_raw).abs().max().item() <= TOL
    assert (ours - ref).abs().max().item() <= TOL
    assert torch.equal(ours[:, 0], raw[:, 0]) and torch.equal(ours[:, 1:], raw[:, :-1])
    assert torch.equal(shift_logits(raw), ours)


def test_parity_reference_is_really_bidirectional(parity_pair):
    model, qwen, head = parity_pair
    ids = torch.randint(0, model.config.vocab_size, (1, 15), generator=torch.Generator().manual_seed(2))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % model.config.vocab_size
    r1, r2 = qwen2_raw_logits(qwen, head, ids), qwen2_raw_logits(qwen, head, ids2)
    with torch.no_grad():
        o1, o2 = model(ids).logits, model(ids2).logits
    assert (r1[0, 0] - r2[0, 0]).abs().max() > 1e-3, "reference Qwen2 is still causal"
    assert (o1[0, 0] - o2[0, 0]).abs().max() > 1e-3, "Dream is not bidirectional"


def test_parity_left_padded_batch_with_dream_positions(parity_pair):
    model, qwen, head = parity_pair
    T, lengths = 18, [18, 11, 5]
    ids = torch.randint(0, model.config.vocab_size, (3, T), generator=torch.Generator().manual_seed(3))
    keep = torch.arange(T)[None, :] >= torch.tensor([T - n for n in lengths])[:, None]
    pos = dream_positions(keep)
    with torch.no_grad():
        ours = model(ids, positions=pos, attention_mask=keep).logits
        ref = shift_logits(qwen2_raw_logits(qwen, head, ids, keep, pos))
        for r, n in enumerate(lengths):  # each row alone, unpadded
            alone = model(ids[r:r + 1, T - n:]).logits[0]
            # the first real column's shifted logit comes from a padding column; the rest must match
            assert (ours[r, T - n + 1:] - alone[1:]).abs().max().item() <= TOL
    assert (ours[keep] - ref[keep]).abs().max().item() <= TOL


class FullThenSliceCache:
    """A minimal KVCacheHook: store K/V of a full forward, then serve a slice's fresh K/V over them."""

    def __init__(self):
        self.k, self.v, self.slice = {}, {}, None
        self.last_n_keys = 0

    def key_mask(self, attention_mask, n_query):
        return attention_mask

    def layer(self, index, k, v):
        if self.slice is None:
            self.k[index], self.v[index] = k, v
            return k, v
        s, e = self.slice
        kk, vv = self.k[index].clone(), self.v[index].clone()
        kk[:, :, s:e], vv[:, :, s:e] = k, v
        return kk, vv


def test_kv_cache_hook_slice_matches_full_forward(dream):
    ids = torch.randint(0, dream.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    cache = FullThenSliceCache()
    with torch.no_grad():
        full = dream(ids, kv_cache=cache).logits
        raw_full = dream(ids, shift=False).logits
        assert (full - dream(ids).logits).abs().max() <= 1e-5
        cache.slice = (8, 14)
        pos = torch.arange(8, 14)
        part = dream(ids[:, 8:14], positions=pos, kv_cache=cache).logits
        part_raw = dream(ids[:, 8:14], positions=pos, kv_cache=cache, shift=False).logits
    assert (part_raw - raw_full[:, 8:14]).abs().max() <= 1e-5
    # shifted inside the fed slice: columns 9..13 are exact, column 8 keeps its own output
    assert (part[:, 1:] - full[:, 9:14]).abs().max() <= 1e-5
    assert torch.equal(part[:, 0], part_raw[:, 0])


def test_flops_params_and_aliases(dream):
    cfg = dream.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (2, 64, 4, 2)
    assert cfg.embedding_size == cfg.vocab_size and cfg.max_sequence_length == 128 and cfg.head_dim == 16
    n = sum(p.numel() for p in dream.parameters()) - dream.model.embed_tokens.weight.numel()
    assert dream.num_params() == n
    assert dream.forward_flops(10, 30) == 2.0 * n * 10 + 4.0 * 2 * 64 * 10 * 30


def test_per_query_mask_and_bad_shapes(dream):
    ids = torch.randint(0, dream.config.vocab_size, (1, 6))
    full = torch.ones(1, 6, 6, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(dream(ids, attention_mask=full).logits, dream(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match="attention_mask"):
        dream(ids, attention_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        dream(ids, positions=torch.arange(5))


# ------------------------------------------------------------------ config


def test_config_reads_dream_keys_and_round_trips():
    cfg = DreamConfig.from_hf_dict(DREAM_7B)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (3584, 28, 4, 128)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (151666, 151643, 151643, 151643)
    assert cfg.to_hf_dict() == DREAM_7B
    several = DreamConfig.from_hf_dict({**DREAM_7B, "eos_token_id": [151643, 151645]})
    assert several.eos_token_id == 151643 and several.to_hf_dict()["eos_token_id"] == [151643, 151645]
    with torch.device("meta"):
        n = DreamModel(cfg).num_params(non_embedding=False)
    assert 7.6e9 < n < 7.7e9  # Dream-v0 7B: 7.62 B parameters


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llada", "d_model": 64}, "LLaDA config"),
    ({"model_type": "qwen3"}, "autoregressive"),
    ({"use_sliding_window": True}, "sliding"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mask_token_id": None}, "mask_token_id"),
    ({"num_key_value_heads": 5}, "divisible"),
    ({"mask_token_id": 152064}, "outside the vocabulary"),
    ({"pad_token_id": 151666}, "mask_token_id and pad_token_id"),
])
def test_bad_configs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        DreamConfig.from_hf_dict({**DREAM_7B, **change})


# ------------------------------------------------------------------ loader

def test_sharded_bf16_round_trip_and_dtypes(dream, tokenizer, tmp_path):
    path = save_dream(dream, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=50_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m16, tok = load_dream(path, dtype="bfloat16")
    assert tok.vocab_size == tokenizer.vocab_size
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    m32, _ = load_dream(path)  # CPU default: float32
    for (name, a), b, c in zip(dream.state_dict().items(), m16.state_dict().values(), m32.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
        assert c.dtype == torch.float32 and torch.equal(b.float(), c), name
    ids = torch.randint(0, dream.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(m16(ids).logits).all()


def test_reader_matches_safetensors_for_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g).half(),
        "c": torch.randn(2, 2, 2, generator=g), "d": torch.randint(-9, 9, (4,), generator=g),
        "e": torch.tensor([True, False, True]), "f": torch.zeros(0, 3), "g": torch.tensor(3.5, dtype=torch.float64),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    entries = read_safetensors_headers(tmp_path)
    got = dict(iter_safetensors(entries))
    ref = load_file(str(tmp_path / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    cast = dict(iter_safetensors(entries, dtype=torch.float32))
    assert cast["a"].dtype == torch.float32 and cast["d"].dtype == torch.int64  # only floats are cast


def test_loader_errors(dream, tokenizer, tmp_path, tiny_checkpoint):
    path = save_dream(dream, tokenizer, tmp_path / "ok", max_shard_bytes=50_000)
    # a LLaDA directory, and the reverse direction is checkpoint.load_model's business
    with pytest.raises(CheckpointError, match="LLaDA checkpoint"):
        load_dream(tiny_checkpoint)
    # a missing shard
    bad = tmp_path / "missing"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    next(bad.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_dream(bad)
    # a truncated shard
    shard = next(path.glob("model-00001-*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_dream(path)
    shard.write_bytes(data)
    # a config that does not fit the weights
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match="implies"):
        load_dream(path)
    # special ids: none in config.json and none in the tokenizer files
    (path / "config.json").write_text(json.dumps({**cfg, "mask_token_id": None}))
    with pytest.raises(CheckpointError, match="mask_token_id"):
        load_dream(path)
    # ... but named by tokenizer_config.json: read from there, not assumed
    (path / "tokenizer_config.json").write_text(json.dumps({"mask_token": MASK_TOKEN}))
    model, _ = load_dream(path)
    assert model.config.mask_token_id == tokenizer.token_to_id(MASK_TOKEN)


MEMORY_SCRIPT = r"""
import json, sys, torch
from diffspec.models.dream import DreamConfig, DreamModel, save_dream, _measure_memory
cfg = DreamConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, mask_token_id=1, eos_token_id=0)
torch.manual_seed(0)
with torch.no_grad():
    model = DreamModel(cfg).to(torch.bfloat16)
save_dream(model, None, sys.argv[1], dtype=torch.bfloat16, max_shard_bytes=12_000_000)
del model
import gc; gc.collect()
from tokenizers import Tokenizer, models
tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<|mask|>": 1}, unk_token="<|endoftext|>"))
tok.save(sys.argv[1] + "/tokenizer.json")
print(json.dumps(_measure_memory(sys.argv[1], "bfloat16")))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loader_memory_script(tmp_path):
    """Loading bf16 weights in bf16 costs about the weights' bytes (no fp32 copy, no mmap pages).

    A 40 MB model here (so the test stays quick); the module docstring gives the 1.4 GB figure."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["weights_bytes"] > 30e6
    assert m["ratio"] <= 1.1, m


# ------------------------------------------------------------------ sampler vs a reference loop

def reference_dream_loop(model, x, mask_id, steps, alg, eps=1e-3, temperature=0.0, top_p=None, top_k=None,
                         alg_temp=None, generator=None, positions=None, key_mask=None):
    """Dream's `_sample`, written out plainly: raw outputs shifted by hand, timesteps linspace(1, eps)."""
    x = x.clone()
    timesteps = torch.linspace(1, eps, steps + 1)

    def sample(logits):
        if temperature > 0:
            logits = logits / temperature
        if top_p is not None and top_p < 1:
            sl, si = torch.sort(logits, descending=True)
            remove = torch.cumsum(F.softmax(sl, -1), -1) > top_p
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = False
            drop = torch.zeros_like(remove).scatter_(-1, si, remove)
            logits = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
        if top_k is not None:
            kth = torch.topk(logits, top_k)[0][..., -1, None]
            logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, -1)
        if temperature > 0:
            x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            conf = probs.gather(-1, x0[:, None]).squeeze(-1)
        else:
            conf, x0 = probs.max(-1)
        if alg == "topk_margin":
            sp = torch.sort(probs, -1, descending=True).values
            conf = sp[:, 0] - sp[:, 1]
        if alg == "entropy":
            conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        return conf, x0

    for i in range(steps):
        mask_index = x == mask_id
        if not mask_index.any():
            break
        with torch.no_grad():
            raw = model(x, positions=positions, attention_mask=key_mask, shift=False).logits
        logits = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
        logits[..., mask_id] = -torch.inf  # diffspec never proposes the mask token
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            transfer = torch.rand(*x0.shape, generator=generator) < p_transfer
            if transfer.any():
                _, x0[transfer] = sample(mask_logits[transfer])
            x[mask_index] = x0.clone()
        else:
            conf, x0 = sample(mask_logits)
            num_mask = mask_index.sum() / mask_index.shape[0]
            k = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
            full = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full[mask_index] = conf
            if k > 0:
                if alg_temp is None or alg_temp == 0:
                    _, idx = torch.topk(full, k)
                else:
                    idx = torch.multinomial(F.softmax(full / alg_temp, -1), num_samples=k, generator=generator)
                x_ = torch.zeros_like(x) + mask_id
                x_[mask_index] = x0.clone()
                rows = torch.arange(x.size(0)).unsqueeze(1).expand_as(idx)
                x[rows, idx] = x_[rows, idx]
    return x


def canvas_for(dream, prompts, gen):
    return Canvas.from_prompts(prompts, gen, dream.config.mask_token_id, dream.config.pad_token_id, 128)


PROMPTS = [[5, 17, 42, 9, 33], [7, 8, 100, 2, 61]]


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("steps", [12, 5])
def test_greedy_decoding_matches_reference_loop(dream, alg, steps):
    cfg = DreamDecodeConfig(max_new_tokens=12, steps=steps, alg=alg, seed=7)
    canvas = canvas_for(dream, PROMPTS, 12)
    start = canvas.x.clone()
    meter = CostMeter()
    dream_decode_canvas(MeteredModel(dream, meter), canvas, cfg, torch.Generator().manual_seed(7))
    ref = reference_dream_loop(dream, start, dream.config.mask_token_id, steps, alg,
                               generator=torch.Generator().manual_seed(7))
    assert torch.equal(canvas.x, ref)
    assert not (canvas.x == dream.config.mask_token_id).any()
    assert torch.equal(canvas.x[:, :5], start[:, :5])  # the prompt is never touched
    if alg != "origin":  # confidence algs commit the rest at the last step: exactly `steps` forwards
        assert meter.nfe == steps


@pytest.mark.parametrize("alg, alg_temp", [("origin", None), ("maskgit_plus", 0.5), ("entropy", None),
                                           ("topk_margin", 0.3)])
def test_sampling_matches_reference_loop_with_the_same_seed(dream, alg, alg_temp):
    kw = dict(temperature=0.8, top_p=0.9, top_k=40, alg_temp=alg_temp)
    cfg = DreamDecodeConfig(max_new_tokens=10, steps=6, alg=alg, **kw)
    canvas = canvas_for(dream, PROMPTS, 10)
    start = canvas.x.clone()
    dream_decode_canvas(MeteredModel(dream, CostMeter()), canvas, cfg, torch.Generator().manual_seed(3))
    ref = reference_dream_loop(dream, start, dream.config.mask_token_id, 6, alg,
                               generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(canvas.x, ref)


class CommitCounter:
    """Wraps the model; records how many cells each forward's step committed (masked cells before
    this forward minus those before the next)."""

    def __init__(self, model, mask_id):
        self.model, self.mask_id, self.masked = model, mask_id, []

    def __call__(self, x, **kw):
        self.masked.append(int((x == self.mask_id).sum()))
        return self.model(x, **kw)

    def committed(self, x):
        left = self.masked[1:] + [int((x == self.mask_id).sum())]
        return [a - b for a, b in zip(self.masked, left)]


@pytest.mark.parametrize("steps, dream_counts, even_counts", [
    (12, [0] + [1] * 10 + [2], [1] * 12),  # Dream's floor: nothing first, two cells jointly last
    (5, [2, 2, 2, 2, 4], [3, 3, 2, 2, 2]),  # even: the remainder in the first steps, as LLaDA
])
def test_transfer_schedules_commit_what_they_say(dream, steps, dream_counts, even_counts):
    mask_id = dream.config.mask_token_id
    for schedule, want in (("dream", dream_counts), ("even", even_counts)):
        cfg = DreamDecodeConfig(max_new_tokens=12, steps=steps, alg="maskgit_plus", transfer_schedule=schedule)
        canvas = canvas_for(dream, [PROMPTS[0]], 12)
        counter = CommitCounter(MeteredModel(dream, CostMeter()), mask_id)
        dream_decode_canvas(counter, canvas, cfg, None)
        assert counter.committed(canvas.x) == want, schedule
        assert not (canvas.x == mask_id).any()


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy", "topk_margin"])
def test_left_padded_batch_equals_rows_alone(dream, alg):
    """Dream's positions and padding mask: a padded row decodes as it does alone (greedy)."""
    prompts = [[5, 17, 42, 9, 33, 4, 71], [7, 8, 100]]
    cfg = DreamDecodeConfig(max_new_tokens=8, steps=8, alg=alg)
    batch = canvas_for(dream, prompts, 8)
    dream_decode_canvas(MeteredModel(dream, CostMeter()), batch, cfg, None)
    for r, p in enumerate(prompts):
        alone = canvas_for(dream, [p], 8)
        dream_decode_canvas(MeteredModel(dream, CostMeter()), alone, cfg, None)
        assert torch.equal(batch.x[r, -8:], alone.x[0, -8:])


def test_generate_end_to_end_cuts_at_eos_and_is_deterministic(dream, tokenizer):
    eos = dream.config.eos_token_id
    biased = random_dream(dream.config, seed=3)
    with torch.no_grad():  # make EOS likely at the end of the answer so the cut is exercised
        biased.lm_head.weight[eos] += 0.3 * biased.lm_head.weight.mean(0)
    cfg = DreamDecodeConfig(max_new_tokens=10, steps=10, alg="origin", temperature=0.9, seed=5, batch_size=2)
    prompts = ["Question: 1 + 2", "Question: 30 + 4 + 5", "Question: 7"]
    a = dream_generate(biased, tokenizer, prompts, cfg)
    b = dream_generate(biased, tokenizer, prompts, cfg)
    assert a.token_ids == b.token_ids and a.texts == b.texts
    for ids, raw in zip(a.token_ids, a.raw_ids):
        assert len(raw) == 10 and eos not in ids
        assert ids == (raw[: raw.index(eos)] if eos in raw else raw)
    assert a.meter.sequences == 3 and a.meter.nfe >= 2
    assert a.summary()["config"]["method"] == "dream"
    c = dream_generate(biased, tokenizer, prompts, cfg.replace(seed=6))
    assert c.raw_ids != a.raw_ids


def test_sampler_runs_a_llada_model_and_refuses_an_ar_model(tiny_model, tokenizer):
    res = dream_generate(tiny_model, tokenizer, ["Question: 1 + 1"],
                         DreamDecodeConfig(max_new_tokens=8, steps=4, alg="entropy"))
    assert len(res.raw_ids[0]) == 8
    from diffspec.models.causal import Qwen3Config, Qwen3Model
    ar = Qwen3Model(Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="masked diffusion model"):
        dream_generate(ar, tokenizer, ["x"], DreamDecodeConfig(max_new_tokens=4, steps=4))


@pytest.mark.parametrize("kw, match", [
    ({"alg": "random"}, "alg must be one of"),
    ({"steps": 0}, "steps"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"alg_temp": -0.1, "alg": "entropy"}, "alg_temp"),
    ({"alg_temp": 0.5, "alg": "origin"}, "alg_temp only applies"),
    ({"eps": 1.0}, "eps"),
    ({"batch_size": True}, "batch_size"),
    ({"seed": "1"}, "seed"),
    ({"transfer_schedule": "linear"}, "transfer_schedule must be one of dream, even"),
    ({"transfer_schedule": "even", "alg": "origin"}, "applies to the confidence-based algs"),
])
def test_config_validation_names_the_option(kw, match):
    with pytest.raises(ValueError, match=match):
        DreamDecodeConfig(**kw)
    cfg = DreamDecodeConfig()
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen


def test_unused_options():
    assert DreamDecodeConfig(alg="origin").unused_options({"alg_temp", "top_p", "top_k", "steps"}) == \
        ["alg_temp", "top_k", "top_p"]
    assert DreamDecodeConfig(alg="origin", temperature=0.5).unused_options({"alg_temp", "top_p"}) == ["alg_temp"]
    assert DreamDecodeConfig(alg="entropy").unused_options({"alg_temp", "top_p", "top_k"}) == []


def test_cli_refuses_a_bad_transfer_schedule(capsys):
    from diffspec.cli import main

    base = ["generate", "--model", str(REPO_ROOT / "diffspec/assets/dream-arith"), "--prompt", "1+1", "--method", "dream"]
    assert main(base + ["--transfer-schedule", "linear"]) == 2
    assert "transfer_schedule must be one of dream, even; got 'linear'" in capsys.readouterr().err
    assert main(base + ["--transfer-schedule", "even"]) == 2  # alg defaults to origin
    assert "applies to the confidence-based algs" in capsys.readouterr().err
