"""`diffspec train block`: the block-causal (two-stream) objective, the dense LLaDA2 it trains, the
warm start from LLaDA, the saved checkpoint and the config checks (issue #39 item 5).

What each test guards against:
- the mask tests: a noisy cell that sees its own block's clean copy (the answer leaks: the loss
  drops to zero and the model learns nothing it can use while decoding), a later block, or another
  block's noisy cells; a clean cell that sees a later block or a noisy cell;
- the sampler-equality test: any difference between what a noisy block sees in training and what
  the `llada2` / `sdar` samplers show it (blocks counted from the answer instead of column 0, the
  prompt attending bidirectionally, wrong RoPE positions for the noisy copy) — a leaking mask is
  shown to fail it;
- the weighting / noise tests: a loss that scores prompt or unmasked cells, or weights them wrong;
- the copy-task test: an objective that cannot train (wrong targets, detached logits);
- the warm-start tests: a LLaDA -> LLaDA2 mapping that permutes q/k/v rows or swaps gate and up;
- the end-to-end test: a checkpoint the published-layout loader, the API and the CLI cannot read
  back or decode, and `--resume`;
- the config tests: a bad value that trains something else silently instead of one clear line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffspec.cli import main
from diffspec.models.checkpoint import save_model
from diffspec.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModel, block_causal_mask, load_llada2
from diffspec.train.block import (CLEAN, NOISY, PAD, SCHEMA, build_block_model, build_two_stream,
                                  llada2_model_section, llada_to_llada2, train_block, two_stream_loss_of,
                                  two_stream_mask, warm_start)

REPO = Path(__file__).resolve().parents[1]
V, MASK, EOS = 20, 19, 18


def tiny_llada2(seed: int = 0, vocab: int = V, layers: int = 2) -> LLaDA2MoeModel:
    torch.manual_seed(seed)
    cfg = LLaDA2MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=None, mask_token_id=vocab - 1,
                          eos_token_id=vocab - 2)
    return LLaDA2MoeModel(cfg).eval()


def rows(P: int, ends: list[int], A: int = 14, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """len(ends) rows of a P-token prompt and an A-token answer whose EOS padding starts at ends[r]."""
    torch.manual_seed(seed)
    ids = torch.randint(0, EOS, (len(ends), P + A))
    for r, e in enumerate(ends):
        ids[r, P + e:] = EOS
    ans = torch.zeros_like(ids, dtype=torch.bool)
    ans[:, P:] = True
    return ids, ans


# ---------------------------------------------------------------- the mask


def test_mask_follows_the_two_stream_rules():
    """One row: clean blocks 0-2, noisy blocks 1-3 (blocks of 2), then padding."""
    kind = torch.tensor([[CLEAN] * 6 + [NOISY] * 6 + [PAD] * 2])
    block = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 0, 0]])
    m = two_stream_mask(kind, block)[0]
    clean, noisy = range(6), range(6, 12)
    for q in range(14):
        for k in range(14):
            bq, bk = int(block[0, q]), int(block[0, k])
            if q in clean:
                want = k in clean and bk <= bq
            elif q in noisy:
                want = (k in clean and bk < bq) or (k in noisy and bk == bq)
            else:
                want = q == k
            assert bool(m[q, k]) == want, (q, k)
    # the bugs, named: a noisy cell of block 1 never sees block 1's clean copy (2, 3), nor block 2 clean
    # (4) or noisy (8), nor block 3; a clean cell never sees a later block or any noisy cell
    assert not m[6, 2:4].any() and not m[6, 4] and not m[6, 8:12].any()
    assert m[6, :2].all() and m[6, 6:8].all()
    assert not m[0, 2:].any() and not m[4, 6:].any() and m[4, :6].all()


def test_two_stream_rows_are_cut_after_the_eos_block_and_mask_answer_cells_only():
    P, L = 5, 4
    ids, ans = rows(P, [2, 6, 13])
    b = build_two_stream(ids, ans, MASK, EOS, [L])
    for r, end in enumerate((8, 12, 20)):  # the block (from column 0) that holds the answer's first EOS
        clean, noisy = b.kind[r] == CLEAN, b.kind[r] == NOISY
        assert b.positions[r, clean].tolist() == list(range(end - L))  # every block but the last
        assert b.positions[r, noisy].tolist() == list(range(P // L * L, end))  # from the prompt's last block
        assert torch.equal(b.x[r, clean], ids[r, :end - L])
        assert (b.positions[r, b.masked[r]] >= P).all()  # prompt cells are never masked
        assert not (b.masked[r] & ~noisy).any()
        assert torch.equal(b.x[r, noisy & ~b.masked[r]], b.target[r, noisy & ~b.masked[r]])
        assert (b.x[r, b.masked[r]] == MASK).all() and int(b.n_answer[r]) == end - P
    assert (b.kind[0] == PAD).sum() == b.x.shape[1] - (8 - L) - (8 - 4)
    no_eos = ids.clone()
    no_eos[0, P:] = 3
    with pytest.raises(ValueError, match="every answer must hold an EOS"):
        build_two_stream(no_eos, ans, MASK, EOS, [L])
    with pytest.raises(ValueError, match="block_lengths"):
        build_two_stream(ids, ans, MASK, EOS, [0])


def test_noisy_blocks_see_exactly_what_the_block_samplers_show():
    """Each noisy block's logits equal the samplers' forward: [clean columns before the block | the
    noisy block] under `block_causal_mask` (blocks from column 0, prompt included) at the columns'
    positions; the clean stream's logits equal a block-causal forward on the clean row alone. With
    the noisy cells also seeing their own block's clean copy (the leak), they do not."""
    model = tiny_llada2()
    P = 5  # not a multiple of any block length: the prompt's last block is decoded as the first one
    ids, ans = rows(P, [3, 7, 10, 13])
    torch.manual_seed(2)
    b = build_two_stream(ids, ans, MASK, EOS, [3, 4, 8])
    assert len(set(b.block_length.tolist())) > 1
    allowed = two_stream_mask(b.kind, b.block)
    logits = model(b.x, positions=b.positions, attention_mask=allowed).logits
    leak = allowed | ((b.kind[:, :, None] == NOISY) & (b.kind[:, None, :] == CLEAN)
                      & (b.block[:, :, None] == b.block[:, None, :]))
    leaked = model(b.x, positions=b.positions, attention_mask=leak).logits
    checked, leakable, caught = 0, 0, 0
    for r in range(4):
        L = int(b.block_length[r])
        clean, noisy = (b.kind[r] == CLEAN).nonzero()[:, 0], (b.kind[r] == NOISY).nonzero()[:, 0]
        if len(clean):
            pos = b.positions[r, clean]
            ref = model(b.x[r, clean][None], positions=pos, attention_mask=block_causal_mask(pos, pos, L)[None]).logits
            assert torch.allclose(ref[0], logits[r, clean], atol=1e-5)
        for blk in b.block[r, noisy].unique().tolist():
            cols = noisy[b.block[r, noisy] == blk]
            canvas = torch.cat([b.target[r, clean[b.block[r, clean] < blk]], b.x[r, cols]])
            pos = torch.arange(len(canvas))
            assert torch.equal(b.positions[r, cols], pos[-len(cols):])
            ref = model(canvas[None], positions=pos, attention_mask=block_causal_mask(pos, pos, L)[None]).logits
            assert torch.allclose(ref[0, -len(cols):], logits[r, cols], atol=1e-5)
            checked += 1
            # a leak can show only where the block has a clean copy (not the last block) that differs
            if (b.block[r, clean] == blk).any() and b.masked[r, cols].any():
                leakable += 1
                caught += not torch.allclose(ref[0, -len(cols):], leaked[r, cols], atol=1e-3)
    assert checked >= 8 and leakable >= 4 and caught == leakable


# ---------------------------------------------------------------- the loss


def test_elbo_and_mean_weightings_score_the_masked_cells():
    model = tiny_llada2()
    ids, ans = rows(5, [4, 9])
    torch.manual_seed(3)
    b = build_two_stream(ids, ans, MASK, EOS, [4])
    logits = model(b.x, positions=b.positions, attention_mask=two_stream_mask(b.kind, b.block)).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b.target, reduction="none")
    m = b.masked.float()
    elbo = ((ce * m / b.t).sum(1) / b.n_answer).mean()
    mean = ((ce * m).sum(1) / m.sum(1)).mean()
    assert torch.allclose(two_stream_loss_of(model, b, "elbo"), elbo, atol=1e-5)
    assert torch.allclose(two_stream_loss_of(model, b, "mean"), mean, atol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        two_stream_loss_of(model, b, "sqrt")


@pytest.mark.parametrize("noise", ["block", "example"])
def test_noise_levels_per_block_or_per_row(noise):
    ids, ans = rows(2, [13] * 6, A=14)
    torch.manual_seed(4)
    b = build_two_stream(ids, ans, MASK, EOS, [4], noise=noise)
    per_row = [b.t[r, b.kind[r] == NOISY].unique() for r in range(6)]
    assert all(len(t) == 4 for t in per_row) if noise == "block" else all(len(t) == 1 for t in per_row)
    levels = torch.cat(per_row).sort().values
    n = len(levels)
    strata = ((levels - 1e-3) / (1 - 1e-3) * n).floor()  # stratified: one level in each 1/n of (eps, 1]
    assert strata.tolist() == list(range(n))
    with pytest.raises(ValueError, match="noise"):
        build_two_stream(ids, ans, MASK, EOS, [4], noise="cell")


def test_loss_goes_down_on_a_tiny_copy_task():
    """The answer repeats the prompt: every noisy cell can read its token from the clean prompt."""
    from diffspec.train.block import block_diffusion_loss

    model = tiny_llada2(vocab=12, layers=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    P = 6
    torch.manual_seed(0)
    losses = []
    for _ in range(60):
        prompt = torch.randint(0, 9, (32, P))
        ids = torch.cat([prompt, prompt, torch.full((32, 2), 10)], dim=1)  # EOS = 10
        ans = torch.zeros_like(ids, dtype=torch.bool)
        ans[:, P:] = True
        loss = block_diffusion_loss(model, ids, ans, mask_id=11, eos_id=10, block_lengths=[2, 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


# ---------------------------------------------------------------- warm start from LLaDA


def _llada2_for(llada, tok) -> LLaDA2MoeModel:
    model = build_block_model(llada2_model_section(llada.config), tok)
    model.load_state_dict(llada_to_llada2(llada.state_dict(), llada.config.n_layers))
    return model.eval()


def test_mapped_llada_gives_the_same_logits(make_model, tokenizer):
    """Random LLaDA weights (norms not 1, RoPE theta 5e5), mapped: the same logits under full
    attention on a fully masked answer, and under a block-causal per-query mask."""
    llada = make_model(seed=3)
    with torch.no_grad():
        for n, p in llada.named_parameters():
            if n.endswith("norm.weight") or n.endswith("ln_f.weight"):
                p.add_(0.3 * torch.randn_like(p))
    model = _llada2_for(llada, tokenizer)
    x = torch.tensor([tokenizer.encode("Question: Tom has 5 pens.\nAnswer:") + [llada.config.mask_token_id] * 16])
    assert torch.allclose(llada(x).logits, model(x).logits, atol=1e-5)
    pos = torch.arange(x.shape[1])
    bc = block_causal_mask(pos, pos, 4)[None]
    assert torch.allclose(llada(x, attention_mask=bc).logits, model(x, attention_mask=bc).logits, atol=1e-5)


def test_bundled_llada_maps_exactly():
    from diffspec.models.checkpoint import load_model

    llada, tok = load_model(REPO / "diffspec/assets/llada-arith", dtype=torch.float32)
    model = _llada2_for(llada, tok)
    x = torch.tensor([tok.encode("Question: Amy has 20 pens. Amy sells 4. How many pens does Amy have now?\n"
                                 "Answer:") + [llada.config.mask_token_id] * 48])
    assert torch.allclose(llada(x).logits, model(x).logits, atol=1e-4)


def test_warm_start_checks_tokenizer_shape_and_math(make_model, tokenizer, tmp_path):
    llada = make_model(seed=3)
    src = save_model(llada, tokenizer, tmp_path / "llada")
    section = llada2_model_section(llada.config)
    model = build_block_model(section, tokenizer)
    warm_start(model, tokenizer, str(src), torch.device("cpu"))
    x = torch.tensor([[5, 6, 7, llada.config.mask_token_id]])
    assert torch.allclose(llada(x).logits, model.eval()(x).logits, atol=1e-5)
    with pytest.raises(ValueError, match="rope_theta = 500000.0"):
        warm_start(build_block_model({**section, "rope_theta": 10000.0}, tokenizer), tokenizer, str(src), "cpu")
    with pytest.raises(ValueError, match="another model shape"):
        warm_start(build_block_model({**section, "intermediate_size": 64}, tokenizer), tokenizer, str(src), "cpu")
    with pytest.raises(ValueError, match="does not exist"):
        warm_start(model, tokenizer, str(tmp_path / "nowhere"), "cpu")


# ---------------------------------------------------------------- end to end


def block_config(tmp_path: Path, edit=None, **train) -> Path:
    cfg = {
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
        "tokenizer": {"vocab_size": 300, "corpus_problems": 300},
        "data": {"gen_length": 48, "block_lengths": [4, 8], "pool": 200, "mc_fraction": 0.1},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 1, "eval_every": 3, "eval_n": 2,
                  "save_every": 2, "seed": 0, "threads": 1, "eval_block_length": 4, **train},
        "save_dtype": "bfloat16", "out": str(tmp_path / "model"), "state_dir": str(tmp_path / "state"),
    }
    if edit:
        edit(cfg)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def test_train_block_saves_a_llada2_checkpoint_that_decodes_and_resumes(tmp_path, capsys):
    from safetensors import safe_open

    from diffspec.api import generate

    out = train_block(block_config(tmp_path))
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llada2_moe" and raw["num_experts"] is None and "moe_intermediate_size" not in raw
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.attention.query_key_value.weight" in f.keys()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, tok = load_llada2(out, dtype="float32")
    assert model.block_causal and not model.config.has_moe and model.config.mask_token_id == tok.token_to_id(
        "<|mdm_mask|>")
    for method in ("llada2", "sdar"):
        res = generate("Question: Tom has 5 pens.\nAnswer:", model=str(out), method=method, gen_length=8,
                       block_length=4, steps=4)
        assert len(res.token_ids[0]) == 8
    assert main(["generate", "--model", str(out), "--method", "llada2", "--gen-length", "8", "--block-length", "4",
                 "--prompt", "Question: Tom has 5 pens.\nAnswer:"]) == 0
    state = torch.load(tmp_path / "state" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and "val_accuracy" in state["extra"]["history"][-1]
    assert main(["train", "block", "--config", str(block_config(tmp_path)), "--resume", "--max-steps", "5"]) == 0
    assert torch.load(tmp_path / "state" / "trainer_state.pt", weights_only=False)["step"] == 5
    capsys.readouterr()


def _set(section, key, value):
    def edit(cfg):
        (cfg[section] if section else cfg)[key] = value
    return edit


@pytest.mark.parametrize("edit,needles", [
    (_set("data", "block_lengths", [4, 0]), ["data.block_lengths[1] must be an integer >= 1"]),
    (_set("data", "block_lengths", []), ["data.block_lengths must be a non-empty list"]),
    (_set("data", "block_length", 4), ["unknown key(s) data.block_length", "block_lengths"]),
    (_set("train", "noise", "cell"), ["train.noise must be one of 'block', 'example'"]),
    (_set("train", "loss_weighting", "sqrt"), ["train.loss_weighting"]),
    (_set("train", "eval_block_length", 16), ["train.eval_block_length 16 is not one of data.block_lengths [4, 8]"]),
    (_set("model", "num_experts", 8), ["model.num_experts", "dense LLaDA2"]),
    (_set("model", "vocab_size", 999), ["model.vocab_size is taken from the tokenizer"]),
    (_set("model", "d_model", 32), ["unknown key(s) model.d_model", "hidden_size"]),
    (_set("model", "num_attention_heads", 3), ["model section", "divisible by num_attention_heads (3)"]),
    (_set("model", "max_position_embeddings", 40), ["max_position_embeddings 40"]),
    (_set("model", "partial_rotary_factor", 1.5), ["model.partial_rotary_factor"]),
    (_set("train", "init_from", "/nonexistent/dir"), ["train.init_from", "does not exist"]),
])
def test_bad_config_values_are_one_clear_line(tmp_path, capsys, edit, needles):
    from test_reliability import one_line_error

    rc = main(["train", "block", "--config", str(block_config(tmp_path, edit))])
    one_line_error(rc, capsys.readouterr().err, *needles)
    assert not (tmp_path / "model").exists()


def test_corrupt_config_and_missing_state(tmp_path, capsys):
    from test_reliability import one_line_error

    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"hidden_size": 32,}')
    one_line_error(main(["train", "block", "--config", str(bad)]), capsys.readouterr().err, "not valid JSON")
    one_line_error(main(["train", "block", "--config", str(block_config(tmp_path)), "--resume"]),
                   capsys.readouterr().err, "no training state")


# ---------------------------------------------------------------- the committed recipe


def test_committed_config_warm_starts_from_the_bundled_llada_and_fits_16_mb():
    from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, load_tokenizer, read_config
    from diffspec.models.llada import LLaDAConfig
    from diffspec.train.common import read_train_config

    cfg = read_train_config(REPO / "configs" / "llada2-arith.json", SCHEMA)
    assert (REPO / cfg["train"]["init_from"]).resolve() == Path(DEFAULT_MODEL_DIR).resolve()
    assert (REPO / cfg["tokenizer_from"]).resolve() == Path(DEFAULT_MODEL_DIR).resolve()
    assert cfg["model"] == llada2_model_section(LLaDAConfig.from_hf_dict(read_config(DEFAULT_MODEL_DIR)))
    assert cfg["train"]["eval_block_length"] in cfg["data"]["block_lengths"] and cfg["save_dtype"] == "bfloat16"
    with torch.device("meta"):
        model = build_block_model(cfg["model"], load_tokenizer(DEFAULT_MODEL_DIR))
    assert sum(t.numel() * 2 for t in model.state_dict().values()) <= 16 * 2**20
    out = REPO / cfg["out"]
    if not (out / "config.json").is_file():
        pytest.skip("diffspec/assets/llada2-arith is not trained yet")
    assert sum(f.stat().st_size for f in out.iterdir()) <= 16 * 2**20
    load_llada2(out)
