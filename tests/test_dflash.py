"""DFlash block drafter: shapes, shared (unsaved) target weights, attention pattern, checkpoint IO, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffspec.models import matmul
from diffspec.models.causal import Qwen3Config, Qwen3Model
from diffspec.models.checkpoint import CheckpointError
from diffspec.models.dflash import DFlashConfig, DFlashDrafter, load_dflash, save_dflash
from diffspec.models.tokenizer import MASK_TOKEN

from test_d2sd import randomize  # weights large enough that wiring bugs show in the logits

TINY = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, eos_token_id=0)
MASK = 1


def make_target(seed: int = 0, **kw) -> Qwen3Model:
    m = Qwen3Model(Qwen3Config(**{**TINY, **kw})).eval()
    randomize(m, seed)
    return m


def make_drafter(target: Qwen3Model, seed: int = 1, **kw) -> DFlashDrafter:
    d = DFlashDrafter(DFlashConfig.for_target(target, MASK, **{"target_layers": (1, 3), "block_size": 8, **kw}),
                      target).eval()
    randomize(d, seed)
    return d


@pytest.fixture(scope="module")
def target() -> Qwen3Model:
    return make_target()


@pytest.fixture(scope="module")
def drafter(target) -> DFlashDrafter:
    return make_drafter(target)


def inputs(B: int = 2, W: int = 8, C: int = 5, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    block = torch.full((B, W), MASK)
    block[:, 0] = torch.randint(2, 300, (B,), generator=g)
    ctx = torch.randn(B, C, 2 * 48, generator=g)
    return block, torch.arange(C, C + W), ctx, torch.arange(C)


@torch.no_grad()
def test_shapes_and_any_window(drafter) -> None:
    block, bpos, ctx, cpos = inputs()
    assert drafter(block, bpos, ctx, cpos).shape == (2, 8, 300)
    block32, bpos32, _, _ = inputs(W=32)
    assert drafter(block32, bpos32.expand(2, 32), ctx, cpos.expand(2, 5)).shape == (2, 32, 300)  # (B, W) positions
    one = drafter(block[:1], bpos, ctx[:1], cpos)
    assert torch.allclose(one, drafter(block, bpos, ctx, cpos)[:1], atol=1e-5)  # rows are independent
    shared = drafter(block, bpos, ctx[:1], cpos)  # one context broadcast over a batch of windows
    assert torch.allclose(shared[1], drafter(block[1:], bpos, ctx[:1], cpos)[0], atol=1e-5)


@torch.no_grad()
def test_shared_context_is_computed_once_and_matches_copies(drafter) -> None:
    """D²SD's windows share one row's context: batch-1 context K/V broadcast = the context copied per window."""
    block, bpos, ctx, cpos = inputs(B=3)
    one = ctx[:1]
    shared = drafter(block, bpos, one, cpos)
    assert torch.allclose(shared, drafter(block, bpos, one.expand(3, -1, -1).contiguous(), cpos), atol=1e-5)
    assert torch.allclose(shared, drafter(block, bpos, one, cpos.expand(3, 5)), atol=1e-5)  # (B, C) positions
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert torch.allclose(shared, drafter(block, bpos, one, cpos, mask), atol=1e-5)
    # FLOPs: the context part is charged once for all windows, the window part per window
    def f(w: int) -> float:
        return drafter.forward_flops(8, 13, windows=w)

    per_window, context = f(2) - f(1), 2 * f(1) - f(2)
    assert context > 0 and per_window > 0 and f(3) == pytest.approx(context + 3 * per_window)


def test_state_dict_holds_only_drafter_weights(drafter, target) -> None:
    keys = set(drafter.state_dict())
    assert not any("embed" in k or "lm_head" in k for k in keys)
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_norm.weight",
            "layers.1.mlp.down_proj.weight"} <= keys
    assert not set(target.state_dict()) & keys
    assert drafter.num_params() == sum(v.numel() for v in drafter.state_dict().values())
    assert drafter.target is target
    assert drafter.forward_flops(8, 13) > drafter.forward_flops(8, 8) > 0


def test_shared_embedding_and_head_are_frozen(target) -> None:
    d = make_drafter(target)
    block, bpos, ctx, cpos = inputs()
    d(block, bpos, ctx, cpos).sum().backward()
    assert target.model.embed_tokens.weight.grad is None
    assert d.fc.weight.grad is not None and d.layers[0].self_attn.k_proj.weight.grad is not None


@torch.no_grad()
def test_window_is_bidirectional(drafter) -> None:
    block, bpos, ctx, cpos = inputs()
    base = drafter(block, bpos, ctx, cpos)
    later = block.clone()
    later[:, 6] = 42  # a later window token changes earlier positions (no causal mask)
    out = drafter(later, bpos, ctx, cpos)
    assert not torch.allclose(out[:, 1], base[:, 1], atol=1e-4)
    assert not torch.allclose(out[:, 0], base[:, 0], atol=1e-4)


@torch.no_grad()
def test_context_sensitivity_and_mask(drafter) -> None:
    block, bpos, ctx, cpos = inputs()
    base = drafter(block, bpos, ctx, cpos)
    moved = ctx.clone()
    moved[:, 2] += 1.0
    assert not torch.allclose(drafter(block, bpos, moved, cpos), base, atol=1e-4)
    assert not torch.allclose(drafter(block, bpos + 1, ctx, cpos), base, atol=1e-4)  # positions matter (RoPE)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.allclose(drafter(block, bpos, ctx, cpos, ctx_mask=mask), base, atol=1e-5)
    mask[:, 2] = False  # a masked-out context entry cannot influence the drafts
    a = drafter(block, bpos, ctx, cpos, ctx_mask=mask)
    assert torch.allclose(a, drafter(block, bpos, moved, cpos, ctx_mask=mask), atol=1e-5)
    keep = [0, 1, 3, 4]
    assert torch.allclose(a, drafter(block, bpos, ctx[:, keep], cpos[keep]), atol=1e-5)


def test_save_load_roundtrip(tmp_path: Path, drafter, target) -> None:
    save_dflash(drafter, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["model_type"] == "dflash" and cfg["target_layers"] == [1, 3] and cfg["mask_token_id"] == MASK
    loaded = load_dflash(tmp_path / "d", target)
    assert loaded.config == drafter.config and not loaded.training
    block, bpos, ctx, cpos = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(block, bpos, ctx, cpos), drafter(block, bpos, ctx, cpos))
    assert DFlashConfig.from_dict(drafter.config.to_dict()) == drafter.config


def test_checkpoint_errors(tmp_path: Path, drafter, target) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dflash(tmp_path / "nope", target)
    d = save_dflash(drafter, tmp_path / "d")
    (d / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_dflash(d, target)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_dflash(d, target)
    save_dflash(drafter, d)
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_dflash(d, target)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(CheckpointError, match="not a DFlash"):
        load_dflash(d, target)
    (d / "config.json").write_text(json.dumps({**drafter.config.to_dict(), "n_layers": 3}))
    with pytest.raises(CheckpointError, match="missing"):
        load_dflash(d, target)
    (d / "config.json").write_text(json.dumps({**drafter.config.to_dict(), "bogus": 1}))
    with pytest.raises(CheckpointError, match="unknown DFlash config keys"):
        load_dflash(d, target)
    save_dflash(drafter, d)
    with pytest.raises(ValueError, match="hidden_size"):
        load_dflash(d, make_target(hidden_size=64))
    with pytest.raises(ValueError, match="vocab_size"):
        load_dflash(d, make_target(vocab_size=320))
    with pytest.raises(ValueError, match="out of range"):
        load_dflash(d, make_target(num_hidden_layers=2))


@pytest.mark.parametrize("change, match", [
    (dict(mask_token_id=None), "mask_token_id is required"),
    (dict(mask_token_id=300), "outside the vocabulary"),
    (dict(target_layers=()), "non-empty"),
    (dict(target_layers=(1, 1)), "distinct"),
    (dict(block_size=1), "block_size"),
    (dict(n_heads=3), "divisible"),
    (dict(head_dim=15), "even"),
    (dict(n_layers=0), "n_layers"),
])
def test_bad_configs_raise(change: dict, match: str) -> None:
    kw = dict(hidden_size=48, vocab_size=300, mask_token_id=MASK)
    with pytest.raises(ValueError, match=match):
        DFlashConfig(**{**kw, **change})


def test_drafter_target_mismatch_raises(target, tokenizer) -> None:
    assert tokenizer.token_to_id(MASK_TOKEN) is not None
    with pytest.raises(ValueError, match="hidden_size"):
        DFlashDrafter(DFlashConfig(hidden_size=64, vocab_size=300, mask_token_id=MASK), target)
    with pytest.raises(ValueError, match="autoregressive"):
        DFlashDrafter(DFlashConfig(hidden_size=48, vocab_size=300, mask_token_id=MASK), torch.nn.Linear(2, 2))
    d = make_drafter(target)
    with pytest.raises(ValueError, match="vocab_size"):
        d.bind(make_target(vocab_size=320))
    other = make_target(seed=5)
    assert d.bind(other).target is other
    with pytest.raises(ValueError, match="ctx_hidden must be"):
        block, bpos, ctx, cpos = inputs()
        d(block, bpos, ctx[..., :48], cpos)


@torch.no_grad()
def test_grouped_contexts_match_one_context_per_window(drafter) -> None:
    """Training's ctx_index: windows naming context rows of an (S, C) batch decode exactly as if each
    window carried its own copy; an index outside the rows is refused."""
    block, bpos, ctx, cpos = inputs(B=3)
    index = torch.tensor([1, 0, 1])
    mask = torch.rand(3, ctx.shape[1]) < 0.7
    mask[:, 0] = True
    grouped = drafter(block, bpos, ctx[:2], cpos, mask, ctx_index=index)
    assert torch.allclose(grouped, drafter(block, bpos, ctx[index], cpos, mask), atol=1e-5)
    with pytest.raises(ValueError, match="ctx_index"):
        drafter(block, bpos, ctx[:2], cpos, mask, ctx_index=torch.tensor([0, 2, 1]))


# --- decoding's savings: context K/V cache, logits only where read, draft vocabulary ------------


@torch.no_grad()
def test_context_cache_and_read_cells_give_the_uncached_logits(drafter) -> None:
    """A ContextKV extended over three calls (as tokens are committed) and a `read` mask give exactly
    the logits of the plain forward over the whole context, on the cells read only."""
    from diffspec.models.dflash import ContextKV

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 12, 2 * 48, generator=g)
    cache = ContextKV(drafter, 20)
    for C in (4, 4, 9, 12):  # a call with nothing new re-uses what is cached
        block = torch.full((3, 8), MASK)
        block[:, 0] = torch.tensor([7, 8, 9])
        bpos = torch.arange(C, C + 8)
        read = torch.zeros(3, 8, dtype=torch.bool)
        read[0, 1:5], read[2, 3:] = True, True
        full = drafter(block, bpos, hidden[:, :C], torch.arange(C))
        got = drafter(block, bpos, hidden[:, :C], torch.arange(C), ctx_cache=cache, read=read)
        assert cache.length == C and got.shape == (int(read.sum()), 300)
        assert torch.allclose(got, full[read], atol=1e-5)
    with pytest.raises(ValueError, match="one row"):
        cache.extend(drafter, hidden[:, :5])  # a context shorter than what is cached is another row
    with pytest.raises(ValueError, match="read must be"):
        drafter(block, bpos, hidden[:, :C], torch.arange(C), read=read[:, :4])
    with pytest.raises(ValueError, match="ctx_cache serves one row"):
        drafter(block, bpos, hidden[:, :C].expand(3, -1, -1), torch.arange(C), ctx_cache=cache)


def test_flops_charge_new_context_cells_and_read_logits_only(drafter) -> None:
    full = drafter.forward_flops(8, 20, windows=2)
    head_row = 2.0 * 48 * 300
    assert drafter.forward_flops(8, 20, windows=2, n_logits=5) == pytest.approx(full - 11 * head_row)
    cached = drafter.forward_flops(8, 20, windows=2, n_ctx=0)
    assert 0 < cached < full and drafter.forward_flops(8, 20, windows=2, n_ctx=12) == pytest.approx(full)


@torch.no_grad()
def test_draft_vocabulary_narrows_the_head_and_round_trips(drafter, target, tmp_path) -> None:
    from diffspec.models.draft_vocab import read_draft_vocab, write_draft_vocab

    d = make_drafter(target)
    block, bpos, ctx, cpos = inputs()
    full = d(block, bpos, ctx, cpos)
    vocab = [5, 17, 299, 0, 42]
    d.set_draft_vocab(vocab)
    small = d(block, bpos, ctx, cpos)
    keep = torch.zeros(300, dtype=torch.bool)
    keep[vocab] = True
    assert torch.isneginf(small[..., ~keep]).all()
    assert torch.allclose(small[..., keep], full[..., keep], atol=1e-5)
    assert d.head_size() == 5 and d.forward_flops(8, 13) < drafter.forward_flops(8, 13)
    for bad in ([], [300], [1, 1]):
        with pytest.raises(ValueError, match="draft vocabulary"):
            make_drafter(target).set_draft_vocab(bad)
    save_dflash(d, tmp_path / "dv")
    assert write_draft_vocab(tmp_path / "dv", {5: 9, 17: 9, 3: 1, 8: 4}, 2, always=[0]) == [5, 17, 0]
    assert load_dflash(tmp_path / "dv", target).draft_vocab.tolist() == [5, 17, 0]
    (tmp_path / "dv" / "draft_vocab.json").write_text('{"ids": "all"}')
    with pytest.raises(CheckpointError, match="list of token ids"):
        load_dflash(tmp_path / "dv", target)
    (tmp_path / "dv" / "draft_vocab.json").write_text('{"ids": [3, 300]}')  # 300 is past the vocabulary
    with pytest.raises(CheckpointError, match=r"draft_vocab.json: a draft vocabulary needs ids in 0..299"):
        load_dflash(tmp_path / "dv", target)


@torch.no_grad()
@pytest.mark.parametrize("packed", [False, True])
def test_a_few_read_cells_run_the_head_on_the_whole_window_without_the_packed_kernel(drafter, packed,
                                                                                    monkeypatch) -> None:
    """Without the packed kernel the CPU's matmul is slower below 16 rows than at 16, so a call reading
    fewer cells computes the whole window's head (and is charged for it); from 16 read cells on, only
    those. With it, a few rows are cheap: only the read cells, always."""
    monkeypatch.setattr(matmul, "_PACKED_OK", packed)
    if packed:
        assert drafter.head_rows(4, 8) == 4 and drafter.head_rows(1, 3 * 8) == 1
    else:
        assert drafter.head_rows(4, 8) == 8 and drafter.head_rows(4, 3 * 8) == 24
    assert drafter.head_rows(16, 40) == 16 and drafter.head_rows(20, 40) == 20
    block, bpos, ctx, cpos = inputs(B=5, W=8)
    full = drafter(block, bpos, ctx[:1], cpos)
    for n in (3, 17):
        read = torch.zeros(5, 8, dtype=torch.bool)
        read.view(-1)[:n] = True
        assert torch.allclose(drafter(block, bpos, ctx[:1], cpos, read=read), full[read], atol=1e-5)


@pytest.mark.skipif(not matmul._PACKED_OK, reason="the packed (oneDNN) kernel is not available here")
def test_the_draft_vocabulary_head_made_inside_inference_mode_takes_the_packed_kernel(drafter) -> None:
    """Decoding runs under inference_mode; a head gathered there would be an inference tensor, which
    `matmul.linear` refuses its packed copy, and a few-row draft head would take the BLAS's slow path."""
    d = make_drafter(drafter.target).set_draft_vocab([5, 17, 3, 8, 0])
    block, bpos, ctx, cpos = inputs(B=1, W=8)
    read = torch.zeros(1, 8, dtype=torch.bool)
    read[0, 1:5] = True
    with torch.inference_mode():
        logits = d(block, bpos, ctx[:1], cpos, read=read)
    gathered = d.__dict__["_draft_head_cache"][2]
    assert not gathered.is_inference()
    assert matmul.kernel(torch.zeros(4, d.config.hidden_size), gathered) == "packed"
    with torch.no_grad():  # the same logits as outside inference mode
        assert torch.equal(d(block, bpos, ctx[:1], cpos, read=read), logits)


@torch.no_grad()
def test_compact_logits_are_the_draft_vocabulary_columns_in_id_order(drafter) -> None:
    """Decoding's compact logits hold only the draft vocabulary's columns, in ascending id order (so an
    argmax breaks ties as over the whole vocabulary: the lowest id), with the full form's values."""
    from diffspec.models.dflash import ContextKV

    d = make_drafter(drafter.target).set_draft_vocab([42, 5, 299, 17, 0])  # most frequent first, not sorted
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 6, 2 * 48, generator=g)
    block = torch.full((1, 8), MASK)
    block[0, 0] = 7
    read = torch.zeros(1, 8, dtype=torch.bool)
    read[0, 1:5] = True
    args = (block, torch.arange(6, 14), hidden, torch.arange(6))
    full = d(*args, ctx_cache=ContextKV(d, 8), read=read)
    compact = d(*args, ctx_cache=ContextKV(d, 8), read=read, compact=True)
    assert d.compact_ids().tolist() == [0, 5, 17, 42, 299]
    assert compact.shape == (4, 5) and torch.allclose(compact, full[:, d.compact_ids()], atol=1e-6)
    assert torch.equal(d.compact_ids()[compact.argmax(-1)], full.argmax(-1))
    assert drafter.compact_ids() is None  # no draft vocabulary: compact logits are the full ones
    with pytest.raises(ValueError, match="compact logits are for decoding with a ctx_cache"):
        d(*args, compact=True)
