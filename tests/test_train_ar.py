"""Smoke tests of the AR target trainer and the DFlash / VP drafter trainers (a few steps of tiny models)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffspec.cli import main
from diffspec.models.causal import Qwen3Config, Qwen3Model, load_causal, save_causal
from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, CheckpointError, load_tokenizer
from diffspec.models.dflash import load_dflash
from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN
from diffspec.train import distill as distill_mod
from diffspec.train.ar import train_ar
from diffspec.train.dflash import WindowData, accepted_length, train_dflash, window_loss

REPO = Path(__file__).resolve().parents[1]
TRAIN = dict(steps=3, batch_size=8, lr=1e-3, warmup=1, eval_every=100, save_every=100, eval_n=3, seed=0,
             max_minutes=0)
AR_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, max_position_embeddings=256)


def write(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def ar_config(d: Path, **train) -> Path:
    return write(d / "ar.json", {"model": AR_MODEL, "data": {"pool": 64, "gen_length": 48},
                                 "train": {**TRAIN, **train}, "out": str(d / "model"), "state_dir": str(d / "state")})


def drafter_config(d: Path, target: Path, kind: str, **extra) -> Path:
    block = 4 if kind == "dflash" else 6
    data = {"pool": 12, "gen_length": 16, "anchors_per_seq": 2, "loss_decay": 3.0}
    if kind == "vp":
        data["gamma"] = 4
    cfg = {"target": str(target), "kind": kind,
           "model": {"n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 64, "target_layers": [1, 2],
                     "block_size": block},
           "data": data, "train": {**TRAIN, "batch_size": 4}, "out": str(d / "model"), "state_dir": str(d / "state"),
           **extra}
    return write(d / f"{kind}.json", cfg)


def state_step(state_dir: Path) -> int:
    return torch.load(state_dir / "trainer_state.pt", map_location="cpu", weights_only=False)["step"]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 target trained for 3 steps (shared by the drafter tests; read-only)."""
    d = tmp_path_factory.mktemp("ar")
    return train_ar(ar_config(d))


def test_ar_trains_saves_and_loads(target_dir):
    model, tok = load_causal(target_dir)
    shared = load_tokenizer(DEFAULT_MODEL_DIR)
    assert tok.fingerprint() == shared.fingerprint()
    assert model.config.vocab_size == shared.vocab_size
    assert model.config.eos_token_ids == (shared.token_to_id(EOS_TOKEN),)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    state = torch.load(target_dir.parent / "state" / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3
    hist = state["extra"]["history"]
    assert hist[-1]["step"] == 3 and 0.0 <= hist[-1]["val_accuracy"] <= 1.0


def test_ar_resume_continues_step_count(tmp_path):
    cfg = ar_config(tmp_path, steps=4)
    train_ar(cfg, max_steps=2)
    assert state_step(tmp_path / "state") == 2
    train_ar(cfg, resume=True)
    assert state_step(tmp_path / "state") == 4
    load_causal(tmp_path / "model")


def test_ar_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer_from"):
        train_ar(write(tmp_path / "a.json", {**json.loads(ar_config(tmp_path).read_text()),
                                             "tokenizer_from": str(tmp_path / "nope")}))
    bad = json.loads(ar_config(tmp_path).read_text())
    bad["model"]["vocab_size"] = 300
    with pytest.raises(ValueError, match="shared tokenizer"):
        train_ar(write(tmp_path / "b.json", bad))
    with pytest.raises(FileNotFoundError, match="no training state"):
        train_ar(ar_config(tmp_path / "fresh"), resume=True)


@pytest.mark.parametrize("kind", ["dflash", "vp"])
def test_drafter_trains_saves_loads_and_resumes(tmp_path, target_dir, kind, monkeypatch):
    cfg = drafter_config(tmp_path, target_dir, kind)
    out = train_dflash(cfg, kind=kind)
    target, _ = load_causal(target_dir)
    drafter = load_dflash(out, target)
    assert drafter.config.block_size == (4 if kind == "dflash" else 6)
    assert drafter.config.target_layers == (1, 2)
    assert drafter.config.mask_token_id == load_tokenizer(DEFAULT_MODEL_DIR).token_to_id(MASK_TOKEN)
    assert json.loads((out / "trained_for.json").read_text())["kind"] == kind
    state = torch.load(tmp_path / "state" / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3
    assert 0.0 <= state["extra"]["history"][-1]["val_accept_len"] <= drafter.config.block_size - 1
    assert (tmp_path / "state" / "continuations" / "train" / "chunk-00000.pt").is_file()

    # Resume continues the step count and reuses the cached target continuations.
    def no_regen(*a, **k):
        raise AssertionError("target continuations regenerated on resume")

    monkeypatch.setattr(distill_mod, "_generate_chunk", no_regen)
    train_dflash(cfg, kind=kind, resume=True, max_steps=5)
    assert state_step(tmp_path / "state") == 5


def test_drafter_errors(tmp_path, target_dir, tokenizer):
    with pytest.raises(CheckpointError, match="does not exist"):
        train_dflash(drafter_config(tmp_path / "m", tmp_path / "missing", "dflash"))
    with pytest.raises(ValueError, match="kind 'vp'"):
        train_dflash(drafter_config(tmp_path / "k", target_dir, "vp"), kind="dflash")
    with pytest.raises(ValueError, match="unknown drafter kind"):
        train_dflash(drafter_config(tmp_path / "u", target_dir, "dflash"), kind="eagle")
    # A target saved with another tokenizer (the test-suite BPE) is refused.
    shared = load_tokenizer(DEFAULT_MODEL_DIR)
    other = save_causal(Qwen3Model(Qwen3Config(**{**AR_MODEL, "vocab_size": shared.vocab_size, "eos_token_id": 0})),
                        tokenizer, tmp_path / "other")
    with pytest.raises(ValueError, match="another tokenizer"):
        train_dflash(drafter_config(tmp_path / "t", other, "dflash", tokenizer_from=str(DEFAULT_MODEL_DIR)))
    # Without tokenizer_from the drafter takes the target's own tokenizer; mask_token must name one
    # of its tokens that is not an EOS.
    with pytest.raises(ValueError, match="mask_token"):
        train_dflash(drafter_config(tmp_path / "n", other, "dflash", mask_token="<|no such token|>"))
    with pytest.raises(ValueError, match="EOS"):
        train_dflash(drafter_config(tmp_path / "e", target_dir, "dflash", mask_token="<|endoftext|>"))


def test_window_layout():
    mask, hid = 1, [torch.arange(7.0)[:, None].repeat(1, 4)]
    seqs = [([10, 11, 12], [20, 21, 22, 0])]  # prompt 3 tokens, answer ends with EOS (0); sequence length 7
    d = WindowData(seqs, hid, "dflash", 4, 4, mask, seed=0)
    b = d.batch([(0, 3, 0), (0, 5, 0)], torch.device("cpu"))
    assert b["block_ids"].tolist() == [[20, mask, mask, mask], [22, mask, mask, mask]]
    assert b["labels"].tolist() == [[-100, 21, 22, 0], [-100, 0, -100, -100]]  # nothing past the answer
    assert b["block_positions"].tolist() == [[3, 4, 5, 6], [5, 6, 7, 8]]
    assert b["ctx_mask"].tolist() == [[True] * 3 + [False] * 4, [True] * 5 + [False] * 2]
    vp = WindowData(seqs, hid, "vp", 5, 4, mask, seed=0)
    b = vp.batch([(0, 3, 2), (0, 5, 3)], torch.device("cpu"))
    assert b["block_ids"].tolist() == [[20, 21, 22, mask, mask], [22, mask, mask, mask, mask]]  # prefix capped
    assert b["labels"].tolist() == [[-100, -100, -100, 0, -100], [-100, 0, -100, -100, -100]]
    assert all(0 <= i <= 3 for w in vp.all_windows() for _, _, i in w)


def test_window_loss_and_acceptance_on_a_perfect_drafter(target_dir):
    """A drafter whose logits are the labels gets zero loss and accepts every in-answer position."""
    target, tok = load_causal(target_dir)
    seqs = [(tok.encode("Question: 1+1?\nAnswer:"), tok.encode(" 2\n#### 2") + [tok.token_to_id(EOS_TOKEN)])]
    hid = [torch.zeros(len(seqs[0][0]) + len(seqs[0][1]), 64)]
    data = WindowData(seqs, hid, "dflash", 4, 4, tok.token_to_id(MASK_TOKEN), seed=0)

    class Oracle(torch.nn.Module):
        config = type("C", (), {"mask_token_id": tok.token_to_id(MASK_TOKEN)})()

        def forward(self, block_ids, block_positions, *_):
            full = seqs[0][0] + seqs[0][1]
            ids = torch.tensor([[full[p] if p < len(full) else 0 for p in row] for row in block_positions.tolist()])
            return torch.nn.functional.one_hot(ids, target.config.vocab_size).float() * 100

    oracle = Oracle()
    b = data.sample(1, 3, torch.device("cpu"))
    assert window_loss(oracle, b).item() < 1e-3
    assert window_loss(oracle, b, decay=2.0).item() < 1e-3
    P, end = len(seqs[0][0]), len(seqs[0][0]) + len(seqs[0][1])
    expected = [min(3, end - 1 - a) for a in range(P, end - 1)]
    assert accepted_length(oracle, data, torch.device("cpu")) == pytest.approx(sum(expected) / len(expected))


def test_cli_train_dispatch(tmp_path, target_dir, capsys):
    assert main(["train", "ar", "--config", str(ar_config(tmp_path / "ar")), "--max-steps", "1"]) == 0
    assert "saved" in capsys.readouterr().out
    assert main(["train", "vp", "--config", str(drafter_config(tmp_path / "vp", target_dir, "vp")),
                 "--max-steps", "1"]) == 0
    assert main(["train", "dflash", "--config", str(drafter_config(tmp_path / "d", tmp_path / "none", "dflash"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "eagle", "--config", str(ar_config(tmp_path / "e"))]) == 2


def test_trained_drafters_plug_into_d2sd(tmp_path, target_dir):
    """The saved drafters load next to the target and D²SD / DFlash decode losslessly with them."""
    from diffspec.speculative.ar import ARConfig, ar_generate
    from diffspec.speculative.d2sd import D2SDConfig, DFlashSpecConfig, d2sd_generate, dflash_generate

    dflash_out = train_dflash(drafter_config(tmp_path / "d", target_dir, "dflash"), kind="dflash", max_steps=1)
    vp_out = train_dflash(drafter_config(tmp_path / "v", target_dir, "vp"), kind="vp", max_steps=1)
    target, tok = load_causal(target_dir)
    drafter, vp = load_dflash(dflash_out, target), load_dflash(vp_out, target)
    prompts = ["Question: Amy has 3 pens. Amy doubles them. How many pens does Amy have now?\nAnswer:"]
    ref = ar_generate(target, tok, prompts, ARConfig(gen_length=12)).token_ids
    assert dflash_generate(target, drafter, tok, prompts, DFlashSpecConfig(gen_length=12, gamma=4)).token_ids == ref
    res = d2sd_generate(target, drafter, vp, tok, prompts, D2SDConfig(gen_length=12, gamma=4, gamma2=6, k=2))
    assert res.token_ids == ref


def test_losses_go_down(tmp_path):
    """A few dozen steps on tiny models: the AR and the drafter losses fall well below their start."""
    ar_dir = tmp_path / "ar"
    train_ar(ar_config(ar_dir, steps=30, eval_every=1, lr=3e-3, eval_n=1))
    hist = torch.load(ar_dir / "state" / "trainer_state.pt", weights_only=False)["extra"]["history"]
    first, last = hist[0]["loss"], sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    d = tmp_path / "d"
    cfg = json.loads(drafter_config(d, ar_dir / "model", "dflash").read_text())
    cfg["train"].update(steps=30, eval_every=1, lr=3e-3)
    train_dflash(write(d / "dflash.json", cfg))
    hist = torch.load(d / "state" / "trainer_state.pt", weights_only=False)["extra"]["history"]
    first, last = hist[0]["loss"], sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_shipped_configs_build():
    """configs/{qwen3,dflash,vp}-arith.json describe models that build against each other."""
    from diffspec.models.dflash import DFlashConfig, DFlashDrafter
    from diffspec.train.common import read_train_config

    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    ar = read_train_config(REPO / "configs" / "qwen3-arith.json")
    target = Qwen3Model(Qwen3Config(**ar["model"], vocab_size=tok.vocab_size, eos_token_id=tok.token_to_id(EOS_TOKEN)))
    for kind in ("dflash", "vp"):
        cfg = read_train_config(REPO / "configs" / f"{kind}-arith.json")
        assert cfg["kind"] == kind and cfg["target"] == ar["out"]
        d = DFlashDrafter(DFlashConfig.for_target(target, tok.token_to_id(MASK_TOKEN), **cfg["model"]), target)
        assert d.config.block_size == (16 if kind == "dflash" else 32)
        assert 2 <= cfg["data"].get("gamma", 16) <= d.config.block_size


def test_continuations_carry_the_hidden_states_of_a_full_forward(tmp_path, target_dir):
    """The taps collected while generating (left-padded batch, KV cache) equal the hidden states of
    one teacher-forced forward over prompt + answer, row by row; a second call reads the cache."""
    from diffspec.train.distill import cached_continuations

    target, tok = load_causal(target_dir)
    prompts = ["Question: 3 + 4 = ?\nAnswer:", "Question: Ana has 12 pens and buys 30 more. How many?\nAnswer:",
               "Question: 9 - 2 = ?\nAnswer:"]
    seqs, hidden = cached_continuations(tmp_path / "c", {"target": "t"}, target, tok, prompts, 12, [1, 2],
                                        torch.float32, batch_size=2)
    for (p, a), h in zip(seqs, hidden):
        assert p == tok.encode(prompts[seqs.index((p, a))]) and len(a) >= 1
        full = torch.tensor([p + a[:-1]])
        ref = torch.cat(target(full, hidden_layers=[1, 2]).hidden_states, dim=-1)[0]
        assert h.shape == ref.shape
        assert torch.allclose(h, ref, atol=1e-4)
    again, _ = cached_continuations(tmp_path / "c", {"target": "t"}, target, tok, prompts, 12, [1, 2], torch.float32)
    assert again == seqs
    with pytest.raises(ValueError, match="another target"):
        cached_continuations(tmp_path / "c", {"target": "u"}, target, tok, prompts, 12, [1, 2], torch.float32)
    with pytest.raises(ValueError, match="other prompts"):
        cached_continuations(tmp_path / "c", {"target": "t"}, target, tok, prompts[::-1], 12, [1, 2], torch.float32)


def test_a_lost_cache_is_rebuilt_from_its_committed_manifest(tmp_path, target_dir, monkeypatch):
    """Each generated chunk's answers go to the manifest; with the cache gone, the same call rebuilds
    the answers and hidden states from it without generating anything, and a manifest made for other
    prompts is refused."""
    from diffspec.train import distill

    target, tok = load_causal(target_dir)
    prompts = [f"Question: {i} + 4 = ?\nAnswer:" for i in range(5)]
    man = tmp_path / "manifest"
    seqs, hidden = distill.cached_continuations(tmp_path / "c", {"target": "t"}, target, tok, prompts, 10, [1, 2],
                                                torch.float32, batch_size=2, manifest=man)
    assert sorted(f.name for f in man.iterdir()) == ["chunk-00000.json.gz"]
    first = (man / "chunk-00000.json.gz").read_bytes()

    def no_generation(*a, **k):
        raise AssertionError("generated although the manifest holds the answers")

    monkeypatch.setattr(distill, "_generate_chunk", no_generation)
    again, rebuilt = distill.cached_continuations(tmp_path / "c2", {"target": "t"}, target, tok, prompts, 10, [1, 2],
                                                  torch.float32, manifest=man)
    assert again == seqs
    for h, r in zip(hidden, rebuilt):
        assert h.shape == r.shape and torch.allclose(h, r, atol=1e-4)
    assert (man / "chunk-00000.json.gz").read_bytes() == first  # reading never rewrites the committed file
    # generating data (only_new): a chunk the manifest holds is not replayed, read or returned
    monkeypatch.setattr(distill, "replay_hidden", lambda *a, **k: pytest.fail("replayed a chunk already made"))
    assert distill.cached_continuations(tmp_path / "c4", {"target": "t"}, target, tok, prompts, 10, [1, 2],
                                        torch.float32, manifest=man, only_new=True) == ([], [])
    assert not list((tmp_path / "c4").glob("chunk-*.pt"))
    # a chunk made without a manifest (another drafter's reader) gets its answers into git all the same
    (man / "chunk-00000.json.gz").unlink()
    distill.cached_continuations(tmp_path / "c2", {"target": "t"}, target, tok, prompts, 10, [1, 2], torch.float32,
                                 manifest=man, only_new=True)
    assert (man / "chunk-00000.json.gz").is_file()
    with pytest.raises(ValueError, match="other prompts"):
        distill.cached_continuations(tmp_path / "c3", {"target": "t"}, target, tok, prompts[::-1], 10, [1, 2],
                                     torch.float32, manifest=man)


def test_distilled_ar_drafter_shares_the_target_embedding_and_drafts_losslessly(tmp_path, target_dir):
    """`train ar` with a target: the drafter ships without embedding / head (the target's, frozen),
    loads only next to its target, and ar-spec with it reproduces the target's greedy output."""
    from diffspec.speculative.ar import SpecConfig, ar_generate, spec_generate

    cfg = write(tmp_path / "d.json", {
        "target": str(target_dir), "save_dtype": "bfloat16",
        "model": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                  "intermediate_size": 48},
        "data": {"pool": 16, "gen_length": 16, "loss_positions": 4, "cache": str(tmp_path / "cache")},
        "train": {**TRAIN, "batch_size": 4, "eval_every": 3}, "out": str(tmp_path / "model"),
        "state_dir": str(tmp_path / "state")})
    out = train_ar(cfg)
    target, tok = load_causal(target_dir)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in names)
    assert "model.embed_tokens.weight" not in names and names
    with pytest.raises(CheckpointError, match="shares its target's embedding"):
        load_causal(out)
    drafter, _ = load_causal(out, embeddings_from=target)
    assert drafter.model.embed_tokens.weight is target.model.embed_tokens.weight
    state = torch.load(tmp_path / "state" / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert 0.0 <= state["extra"]["history"][-1]["val_agreement"] <= 1.0
    prompts = ["Question: 3 + 4 = ?\nAnswer:", "Question: 12 - 5 = ?\nAnswer:"]
    cfg_ar = SpecConfig(gen_length=16, batch_size=1, gamma=3)
    spec = spec_generate(target, drafter, tok, prompts, cfg_ar)
    assert spec.token_ids == ar_generate(target, tok, prompts, cfg_ar).token_ids
    train_ar(cfg, resume=True, max_steps=4)
    assert state_step(tmp_path / "state") == 4
    bad = json.loads(cfg.read_text())
    bad["model"]["hidden_size"] = 64
    with pytest.raises(ValueError, match="hidden_size is taken from the target"):
        train_ar(write(tmp_path / "bad.json", bad))


def test_sampled_loss_scores_the_chosen_answer_cells_only():
    from diffspec.train.ar import ar_loss, sampled_loss

    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(**{**AR_MODEL, "vocab_size": 50, "eos_token_id": 0}))
    ids = torch.randint(1, 50, (3, 10))
    ans = torch.zeros(3, 10, dtype=torch.bool)
    ans[0, 4:], ans[1, 2:9], ans[2, 7:] = True, True, True
    assert torch.allclose(sampled_loss(model, ids, ans, 100), ar_loss(model, ids, ans), atol=1e-6)
    seen = []
    real = model.forward

    def spy(x, **kw):
        seen.append(kw["logits_mask"].sum(1).tolist())
        return real(x, **kw)

    model.forward = spy
    sampled_loss(model, ids, ans, 2)
    assert seen == [[2, 2, 2]]  # two cells per row, each a cell whose next token is an answer token


def test_bundled_drafters_follow_the_target():
    """SmolLM2 (its converted config records the GGUF source) gets the SmolLM2 drafters, any other
    target the arith ones."""
    from diffspec.models.gguf import SMOLLM2_FILE
    from diffspec.speculative.armethods import DEFAULT_DRAFTERS, DEFAULT_VP, SMOLLM2_DRAFTERS, bundled_drafter

    plain = Qwen3Model(Qwen3Config(**{**AR_MODEL, "vocab_size": 50, "eos_token_id": 0}))
    smol = Qwen3Model(Qwen3Config(**{**AR_MODEL, "vocab_size": 50, "eos_token_id": 0},
                                  extra={"diffspec_gguf": {"source": SMOLLM2_FILE}}))
    for kind in ("ar-spec", "dflash", "d2sd"):
        assert bundled_drafter(kind, plain) == DEFAULT_DRAFTERS[kind]
        assert bundled_drafter(kind, smol) == SMOLLM2_DRAFTERS[kind]
    assert bundled_drafter("vp", plain) == DEFAULT_VP and bundled_drafter("vp", smol) == SMOLLM2_DRAFTERS["vp"]


def test_drafter_prompt_sources_are_checked(tmp_path):
    """data.source picks the prompts; options of the other source and impossible pools are refused."""
    from diffspec.train.distill import source_prompts

    with pytest.raises(ValueError, match="data.source must be one of"):
        source_prompts({"source": "wiki"}, 4, 2, 0, None)
    with pytest.raises(ValueError, match="apply to data.source 'gsm8k'"):
        source_prompts({"chat": True}, 4, 2, 0, None)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question": f"What is {i} + 1?"}) + "\n" for i in range(5)))
    with pytest.raises(ValueError, match="exceeds the 5 questions"):
        source_prompts({"source": "gsm8k", "questions": str(q), "chat": False}, 4, 2, 0, None)
    with pytest.raises(ValueError, match="needs the target's checkpoint directory"):
        source_prompts({"source": "gsm8k", "questions": str(q)}, 3, 2, 0, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        source_prompts({"source": "gsm8k", "questions": str(tmp_path / "none.jsonl")}, 3, 2, 0, None)
    train, val = source_prompts({"source": "gsm8k", "questions": str(q), "chat": False}, 3, 2, 0, None)
    assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)
    # validation comes from the end of the shuffled list: the training prompts do not move with it
    train4, val4 = source_prompts({"source": "gsm8k", "questions": str(q), "chat": False}, 3, 1, 0, None)
    assert train4 == train and val4 == val[1:]


def test_data_only_is_for_the_drafters_that_read_continuations(capsys):
    from diffspec.cli import main

    assert main(["train", "mdm", "--config", str(REPO / "configs" / "llada-arith.json"), "--data-only"]) == 2
    assert "--data-only applies to dflash and vp" in capsys.readouterr().err


def test_draft_vocab_from_a_manifest(tmp_path, capsys):
    """`diffspec draft-vocab` keeps the most frequent answer ids of the manifest's train chunks and
    reports how much of the held-out answers they cover."""
    from diffspec.cli import main
    from diffspec.train.distill import write_manifest_chunk

    man = tmp_path / "m"
    write_manifest_chunk(man / "train" / "chunk-00000.json.gz", "x", [([1], [5, 5, 5, 7, 7, 9]), ([2], [5, 0])], 1.0)
    write_manifest_chunk(man / "val" / "chunk-00000.json.gz", "y", [([1], [5, 7, 8, 0])], 1.0)
    drafter = tmp_path / "d"
    drafter.mkdir()
    assert main(["draft-vocab", str(drafter), "--manifest", str(man), "--size", "2"]) == 2  # not a drafter
    assert "no config.json" in capsys.readouterr().err
    (drafter / "config.json").write_text("{}")
    assert main(["draft-vocab", str(drafter), "--manifest", str(man), "--size", "2"]) == 0
    assert json.loads((drafter / "draft_vocab.json").read_text()) == {"ids": [5, 7]}
    err = capsys.readouterr().err
    assert "75.00% of the answer tokens" in err and "50.00% of held-out" in err
    assert main(["draft-vocab", str(drafter), "--manifest", str(tmp_path / "none")]) == 2
    assert "no manifest chunks" in capsys.readouterr().err


def test_drafter_trains_and_ships_a_draft_vocabulary(tmp_path, target_dir):
    """data.draft_vocab: the most frequent tokens of the target's training answers (plus EOS) become the
    head the drafter trains and ships with; a resume keeps them, a resume with another size is refused."""
    arith = REPO / "diffspec" / "assets" / "qwen3-arith"  # a target that writes varied answers
    cfg = drafter_config(tmp_path, arith, "dflash", tokenizer_from=str(DEFAULT_MODEL_DIR))
    raw = json.loads(cfg.read_text())
    raw["data"]["draft_vocab"] = 6
    cfg.write_text(json.dumps(raw))
    out = train_dflash(cfg, kind="dflash")
    target, tok = load_causal(arith)
    seqs = []
    for f in sorted((tmp_path / "state" / "continuations" / "train").glob("chunk-*.pt")):
        seqs += torch.load(f, map_location="cpu", weights_only=False)["seqs"]
    counts: dict[int, int] = {}
    for _, ans in seqs:
        for t in ans:
            counts[t] = counts.get(t, 0) + 1
    top = sorted(counts, key=lambda i: (-counts[i], i))[:6]
    ids = json.loads((out / "draft_vocab.json").read_text())["ids"]
    assert len(counts) > 6 and ids[:6] == top and set(ids[6:]) <= {tok.token_to_id(EOS_TOKEN)}
    drafter = load_dflash(out, target)
    assert drafter.draft_vocab.tolist() == ids and drafter.head_size() == len(ids)
    kept = tmp_path / "state" / "training_vocab.json"
    edited = ids[::-1]  # what the head was trained on is kept, not recomputed from the (maybe grown) data
    kept.write_text(json.dumps({"size": 6, "ids": edited}))
    train_dflash(cfg, kind="dflash", resume=True, max_steps=4)
    assert json.loads((out / "draft_vocab.json").read_text())["ids"] == edited
    raw["data"]["draft_vocab"] = 7
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="draft_vocab 6, the config now says 7"):
        train_dflash(cfg, kind="dflash", resume=True, max_steps=5)


def test_window_loss_over_a_draft_vocabulary_is_the_restricted_cross_entropy(target_dir):
    """The loss with a draft vocabulary is the cross-entropy of the head's draft columns alone, each
    label at its column in the draft order, and a label outside the vocabulary adds nothing."""
    from diffspec.models.dflash import DFlashConfig, DFlashDrafter

    target, tok = load_causal(target_dir)
    mask = tok.token_to_id(MASK_TOKEN)
    torch.manual_seed(0)
    drafter = DFlashDrafter(DFlashConfig.for_target(target, mask, n_layers=1, n_heads=2, n_kv_heads=1,
                                                    intermediate_size=64, target_layers=[1, 2], block_size=4), target)
    seqs = [(tok.encode("Question: 3+4?\nAnswer:"), tok.encode(" 7\n#### 7") + [tok.token_to_id(EOS_TOKEN)])]
    hid = [torch.randn(len(seqs[0][0]) + len(seqs[0][1]), 64)]
    b = WindowData(seqs, hid, "dflash", 4, 4, mask, seed=0).sample(1, 4, torch.device("cpu"))
    labels = b["labels"]
    seen = sorted({int(t) for t in labels[labels != -100]})
    vocab = [seen[-1], 3, *seen[:-2]]  # out of frequency order, with one label left out and one never used
    with torch.no_grad():
        full = drafter(b["block_ids"], b["block_positions"], b["ctx_hidden"], b["ctx_positions"], b["ctx_mask"],
                       b["ctx_index"])
        drafter.set_draft_vocab(vocab)
        got = window_loss(drafter, b)
    cols = full[..., vocab].log_softmax(-1)
    want = [-cols[i, j, vocab.index(int(t))] for i, row in enumerate(labels) for j, t in enumerate(row)
            if int(t) in vocab]
    assert len(want) < int((labels != -100).sum())  # the left-out label really was skipped
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    with torch.no_grad():  # no label in the vocabulary: a zero loss, not NaN
        drafter.set_draft_vocab([i for i in range(20) if i not in seen][:3])
        assert window_loss(drafter, b).item() == 0.0 and window_loss(drafter, b, decay=2.0).item() == 0.0


def test_sharded_data_generation_fills_the_same_cache(tmp_path, target_dir, monkeypatch, capsys):
    """`--data-only --shard I/N`: each process makes only its chunks (c % N == I); together they leave the
    chunks, answers and manifest one unsharded run makes."""
    monkeypatch.setattr(distill_mod, "CHUNK", 4)  # 12 train prompts: 3 chunks
    whole = drafter_config(tmp_path / "whole", target_dir, "dflash")
    train_dflash(whole, kind="dflash", data_only=True)
    split = drafter_config(tmp_path / "split", target_dir, "dflash")
    made: list[list[int]] = []
    for i in (0, 1):
        before = {f.name for f in (tmp_path / "split" / "state" / "continuations" / "train").glob("chunk-*.pt")}
        assert main(["train", "dflash", "--config", str(split), "--data-only", "--shard", f"{i}/2"]) == 0
        after = {f.name for f in (tmp_path / "split" / "state" / "continuations" / "train").glob("chunk-*.pt")}
        made.append(sorted(int(n[6:11]) for n in after - before))
    assert made == [[0, 2], [1]]
    for c in range(3):
        a, b = (torch.load(d / "state" / "continuations" / "train" / f"chunk-{c:05d}.pt", weights_only=False)
                for d in (tmp_path / "whole", tmp_path / "split"))
        assert a["seqs"] == b["seqs"] and all(torch.equal(x, y) for x, y in zip(a["hidden"], b["hidden"]))
    assert main(["train", "dflash", "--config", str(split), "--shard", "0/2"]) == 2
    assert "--shard applies to --data-only" in capsys.readouterr().err
    assert main(["train", "dflash", "--config", str(split), "--data-only", "--shard", "2/2"]) == 2
    assert "0 <= I < N" in capsys.readouterr().err


def test_distilled_ar_drafter_trains_each_stage_on_its_own_pool(tmp_path, target_dir, monkeypatch):
    """train.stages' train_pool: the first stage draws from the first answers only, the next from all."""
    from diffspec.train.mdm import MDMBatcher

    cfg = {"target": str(target_dir),
           "model": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                     "intermediate_size": 48},
           "data": {"pool": 12, "gen_length": 8, "loss_positions": 4, "cache": str(tmp_path / "cache")},
           "train": {**TRAIN, "batch_size": 2, "stages": [{"train_pool": 3, "steps": 2}, {"steps": 2}]},
           "out": str(tmp_path / "model"), "state_dir": str(tmp_path / "state")}
    pools = []
    real_next = MDMBatcher.next

    def next_batch(self):
        pools.append(len(self.items))
        return real_next(self)

    monkeypatch.setattr(MDMBatcher, "next", next_batch)
    train_ar(write(tmp_path / "d.json", cfg))
    assert len(pools) == 4 and max(pools[:2]) <= 3 and pools[2] == pools[3] > 3
    assert state_step(tmp_path / "state") == 4
    cfg["train"]["stages"][0]["train_pool"] = 13
    with pytest.raises(ValueError, match=r"train.stages\[0\].train_pool \(13\) must be <= data.pool \(12\)"):
        train_ar(write(tmp_path / "e.json", cfg))


def test_dflash_drafter_trains_each_stage_on_its_own_pool(tmp_path, target_dir, monkeypatch):
    """train.stages' train_pool for the DFlash trainer: batches come from the stage's first answers;
    the draft vocabulary comes from the first stage's."""
    seen = []
    real_sample = WindowData.sample

    def sample(self, *a, **k):
        seen.append(self.active)
        return real_sample(self, *a, **k)

    monkeypatch.setattr(WindowData, "sample", sample)
    cfg = json.loads(drafter_config(tmp_path, target_dir, "dflash").read_text())
    cfg["train"]["stages"] = [{"train_pool": 4, "steps": 2}, {"steps": 3}]
    train_dflash(write(tmp_path / "staged.json", cfg))
    assert seen[:2] == [4, 4] and seen[2:] == [12, 12, 12]
    assert state_step(tmp_path / "state") == 5
    cfg["train"]["stages"][1]["train_pool"] = 13
    with pytest.raises(ValueError, match=r"train_pool \(13\) must be <= data.pool \(12\)"):
        train_dflash(write(tmp_path / "too_big.json", cfg))


@pytest.mark.parametrize("name, match", [(EOS_TOKEN, "one of the target's EOS ids"), ("<nope>", "has no token")])
def test_dflash_mask_token_must_be_a_token_the_target_never_writes(tmp_path, target_dir, name, match):
    cfg = json.loads(drafter_config(tmp_path, target_dir, "dflash").read_text())
    with pytest.raises(ValueError, match=match):
        train_dflash(write(tmp_path / "m.json", {**cfg, "mask_token": name}))


def test_distilled_ar_drafter_reads_the_committed_answers(tmp_path, target_dir, monkeypatch):
    """With data.manifest and a fresh cache, `train ar` reads the DFlash drafters' committed answers:
    nothing is generated, no hidden state is replayed, and it trains on exactly those answers."""
    data = drafter_config(tmp_path / "d", target_dir, "dflash", data={"pool": 16, "gen_length": 16,
                                                                       "manifest": str(tmp_path / "man")})
    train_dflash(data, kind="dflash", data_only=True)
    answers = [a for f in sorted((tmp_path / "man" / "train").glob("*.json.gz"))
               for a in distill_mod.read_manifest_chunk(f)["answers"]]
    seen: list = []
    real = distill_mod.cached_continuations

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out[0])
        return out

    monkeypatch.setattr(distill_mod, "cached_continuations", spy)
    monkeypatch.setattr(distill_mod, "_generate_chunk", lambda *a, **k: pytest.fail("generated"))
    monkeypatch.setattr(distill_mod, "replay_hidden", lambda *a, **k: pytest.fail("replayed hidden states"))
    cfg = write(tmp_path / "ar.json", {
        "target": str(target_dir),
        "model": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                  "intermediate_size": 48},
        "data": {"pool": 16, "gen_length": 16, "loss_positions": 4, "cache": str(tmp_path / "own"),
                 "manifest": str(tmp_path / "man")},
        "train": {**TRAIN, "batch_size": 4, "eval_n": 3}, "out": str(tmp_path / "model"),
        "state_dir": str(tmp_path / "state")})
    train_ar(cfg)
    assert [a for _, a in seen[0]] == answers and len(answers) == 16


def test_train_pool_trains_on_the_first_answers_of_a_larger_pool(tmp_path, target_dir, monkeypatch):
    """data.train_pool: training reads (and makes) only the pool's first answers; --data-only makes the
    whole pool, so data generation can run ahead of a training run on one config."""
    monkeypatch.setattr(distill_mod, "CHUNK", 4)
    cfg = drafter_config(tmp_path, target_dir, "dflash")
    raw = json.loads(cfg.read_text())
    raw["data"]["train_pool"] = 8
    cfg.write_text(json.dumps(raw))
    train_dflash(cfg, kind="dflash")
    chunks = tmp_path / "state" / "continuations" / "train"
    assert sorted(f.name for f in chunks.glob("chunk-*.pt")) == ["chunk-00000.pt", "chunk-00001.pt"]
    train_dflash(cfg, kind="dflash", data_only=True)
    assert len(list(chunks.glob("chunk-*.pt"))) == 3
    raw["data"]["train_pool"] = 6  # not whole chunks: the chunks are read whole, then cut to 6 answers
    cfg.write_text(json.dumps(raw))
    seen: list[int] = []

    def counting(seqs, *a, **k):
        seen.append(len(seqs))
        return WindowData(seqs, *a, **k)

    monkeypatch.setattr("diffspec.train.dflash.WindowData", counting)
    train_dflash(cfg, kind="dflash", max_steps=1)
    assert seen[0] == 6 and len(list(chunks.glob("chunk-*.pt"))) == 3
    raw["data"]["train_pool"] = 13
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="train_pool .13. must be <= data.pool .12."):
        train_dflash(cfg, kind="dflash")


def test_draft_vocab_command_counts_the_first_answers_and_reports_coverage(tmp_path, target_dir, capsys):
    """`diffspec draft-vocab` keeps the most frequent answer tokens; --answers pins the vocabulary to the
    first answers, so chunks made later do not change a shipped drafter's head."""
    from diffspec.models.draft_vocab import read_draft_vocab
    from diffspec.train.distill import write_manifest_chunk

    m = tmp_path / "manifest"
    write_manifest_chunk(m / "train" / "chunk-00000.json.gz", "x", [([1], [5, 5, 6, 2]), ([1], [7, 2])], 0.0)
    write_manifest_chunk(m / "train" / "chunk-00001.json.gz", "x", [([1], [9, 9, 9, 2])], 0.0)
    write_manifest_chunk(m / "val" / "chunk-00000.json.gz", "x", [([1], [5, 9, 2, 11])], 0.0)
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "config.json").write_text("{}")
    assert main(["draft-vocab", str(drafter), "--manifest", str(m), "--size", "100", "--answers", "2"]) == 0
    assert read_draft_vocab(drafter / "draft_vocab.json") == [2, 5, 6, 7]  # by count, then id; 9 comes later
    assert "in 2 answers" in capsys.readouterr().err
    assert main(["draft-vocab", str(drafter), "--manifest", str(m), "--size", "2"]) == 0
    assert read_draft_vocab(drafter / "draft_vocab.json") == [2, 9]
    assert "50.00% of held-out answer tokens" in capsys.readouterr().err  # 2 and 9 of val's 5, 9, 2, 11
    with pytest.raises(ValueError, match="holds 3 answers, fewer than the 5"):
        distill_mod.build_draft_vocab(drafter, m, 10, answers=5)
    with pytest.raises(ValueError, match="answers must be a whole number"):
        distill_mod.build_draft_vocab(drafter, m, 10, answers=0)
    with pytest.raises(ValueError, match="size must be a whole number"):
        distill_mod.build_draft_vocab(drafter, m, 0)
