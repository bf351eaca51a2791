"""`diffspec train mdm` end to end on a tiny config: trains, saves a loadable checkpoint, resumes."""
from __future__ import annotations

import json

import pytest


from diffspec.cli import main
from diffspec.models.checkpoint import load_model
from diffspec.train.mdm import arith_spec, build_tokenizer, train_mdm


def _config(tmp_path, top: dict | None = None, **train):
    """A tiny config; `top` replaces whole top-level sections (e.g. a Dream model section)."""
    cfg = {
        "model": {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "mlp_hidden_size": 64,
                  "max_sequence_length": 256},
        "tokenizer": {"vocab_size": 300, "corpus_problems": 300},
        "data": {"gen_length": 48, "block_length": 16, "pool": 200, "mc_fraction": 0.1},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 1, "eval_every": 3, "eval_n": 2,
                  "save_every": 2, "seed": 0, "threads": 1, "block_fraction": 0.5, **train},
        "out": str(tmp_path / "model"), "state_dir": str(tmp_path / "state"), **(top or {}),
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def test_train_mdm_saves_a_loadable_model_and_resumes(tmp_path):
    path = _config(tmp_path)
    out = train_mdm(path)
    model, tok = load_model(out)
    assert model.config.n_layers == 1 and tok.vocab_size <= model.config.embedding_size
    import torch

    state = torch.load(tmp_path / "state" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["extra"]["history"][-1]["step"] == 3
    assert len(state["extra"]["aux_rng"]) == 1  # the batcher's RNG travels with the state
    train_mdm(path, resume=True, max_steps=5)
    assert torch.load(tmp_path / "state" / "trainer_state.pt", weights_only=False)["step"] == 5


def test_train_mdm_cli_errors(tmp_path, capsys):
    assert main(["train", "mdm", "--config", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    path = _config(tmp_path, amp="fp8")
    assert main(["train", "mdm", "--config", str(path)]) == 2
    assert "train.amp" in capsys.readouterr().err
    assert main(["train", "mdm", "--config", str(_config(tmp_path, block_fraction=1.5))]) == 2
    assert "block_fraction" in capsys.readouterr().err
    assert main(["train", "mdm", "--config", str(_config(tmp_path)), "--resume"]) == 2
    assert "no training state" in capsys.readouterr().err


def test_train_mdm_tokenizer_from_and_init_from_checks(tmp_path):
    """A second model borrows the first one's tokenizer; a warm start must share tokenizer and shape."""
    first = train_mdm(_config(tmp_path, steps=1))
    _, tok = load_model(first)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    cfg = json.loads(_config(second_dir, steps=1, init_from=str(first)).read_text())
    cfg["tokenizer_from"] = str(first)
    del cfg["tokenizer"]  # borrowing and training a BPE are exclusive
    (second_dir / "cfg.json").write_text(json.dumps(cfg))
    _, tok2 = load_model(train_mdm(second_dir / "cfg.json"))
    assert tok2.fingerprint() == tok.fingerprint()

    # another tokenizer (vocab 280) cannot warm-start from the first model
    third = tmp_path / "third"
    third.mkdir()
    cfg = json.loads(_config(third, steps=1, init_from=str(first)).read_text())
    cfg["tokenizer"]["vocab_size"] = 280
    (third / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer_from"):
        train_mdm(third / "cfg.json")
    # same tokenizer, another shape
    cfg["tokenizer_from"] = str(first)
    del cfg["tokenizer"]
    cfg["model"]["n_layers"] = 2
    (third / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model shape"):
        train_mdm(third / "cfg.json")
    cfg["tokenizer_from"] = str(tmp_path / "nowhere")
    (third / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="tokenizer_from"):
        train_mdm(third / "cfg.json")


def test_train_mdm_data_arith_spec(tmp_path):
    from diffspec.tasks import arith

    assert arith_spec({}) == arith.TASK
    assert arith_spec({"data": {"arith": {"max_value": 99, "max_operand": 30, "max_start": 50,
                                          "triple_prob": 0.4, "restate": True}}}) == arith.HARD
    with pytest.raises(ValueError, match="data.arith"):
        arith_spec({"data": {"arith": {"max_operands": 3}}})
    cfg = json.loads(_config(tmp_path, steps=1).read_text())
    cfg["data"]["arith"] = {"max_value": 99}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert (train_mdm(tmp_path / "cfg.json") / "config.json").is_file()


def test_bundled_model_comes_from_one_from_scratch_config():
    """configs/llada-arith.json alone writes the bundled model: no warm start, no borrowed tokenizer, a
    time budget (so a run ends with a fully decayed LR whatever the machine's speed), the bundled
    model's shape, and a BPE that rebuilds exactly the bundled tokenizer."""
    from pathlib import Path

    from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, load_tokenizer, read_config
    from diffspec.models.llada import LLaDAConfig
    from diffspec.train.common import read_train_config

    root = Path(__file__).resolve().parents[1]
    cfg = read_train_config(root / "configs" / "llada-arith.json")
    assert "init_from" not in cfg["train"] and "tokenizer_from" not in cfg
    assert (root / cfg["out"]).resolve() == Path(DEFAULT_MODEL_DIR).resolve()
    assert cfg["train"]["max_minutes"] > 0
    arith_spec(cfg)
    bundled = LLaDAConfig.from_hf_dict(read_config(DEFAULT_MODEL_DIR))
    for key, value in cfg["model"].items():
        assert getattr(bundled, key) == value, key
    assert build_tokenizer(cfg).fingerprint() == load_tokenizer(DEFAULT_MODEL_DIR).fingerprint()


def test_tokenizer_section_is_checked():
    with pytest.raises(ValueError, match="tokenizer must be"):
        build_tokenizer({"tokenizer": {"vocab": 512}})
    with pytest.raises(ValueError, match="tokenizer.arith"):
        build_tokenizer({"tokenizer": {"arith": {"max_values": 3}}})
    with pytest.raises(ValueError, match="not both"):
        build_tokenizer({"tokenizer": {"vocab_size": 512}, "tokenizer_from": "diffspec/assets/llada-arith"})


def test_train_mdm_two_stream_and_loss_options_run_and_are_checked(tmp_path, capsys):
    """The block-diffusion rows, content-only block choice and mean weighting train end to end."""
    out = train_mdm(_config(tmp_path, steps=2, two_stream_fraction=0.5, two_stream_block=8, block_k="content",
                            loss_weighting="mean"))
    assert (out / "model.safetensors").is_file()
    for bad, word in (({"two_stream_fraction": 1.5}, "two_stream_fraction"), ({"block_k": "last"}, "block_k"),
                      ({"loss_weighting": "sqrt"}, "loss_weighting")):
        assert main(["train", "mdm", "--config", str(_config(tmp_path, **bad))]) == 2
        assert word in capsys.readouterr().err


def _tiny_llada(vocab=20):
    import torch
    from diffspec.models.llada import LLaDAConfig, LLaDAModel

    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=vocab,
                      max_sequence_length=128, mask_token_id=vocab - 1, eos_token_id=vocab - 2)
    return LLaDAModel(cfg).eval()


def test_two_stream_noisy_block_sees_exactly_its_clean_prefix():
    """Each noisy block's logits equal a forward on [prompt, clean blocks before it, the noisy block]
    where the prompt sees the prompt and a clean block the clean blocks up to its own; answers are cut
    after the block that holds their first EOS."""
    import torch
    from diffspec.train.mdm import two_stream_loss

    model = _tiny_llada()
    seen = {}
    forward = model.forward

    def spy(x, positions=None, attention_mask=None, **kw):
        out = forward(x, positions=positions, attention_mask=attention_mask, **kw)
        seen.update(x=x, logits=out.logits)
        return out

    model.forward = spy
    P, L, b, mask, eos = 5, 12, 4, 19, 18
    torch.manual_seed(1)
    ids = torch.randint(0, 17, (2, P + L))
    ids[0, P + 7:], ids[1, P + 10:] = eos, eos  # answers end in block 1 and block 2
    ans = torch.zeros_like(ids, dtype=torch.bool)
    ans[:, P:] = True
    loss = two_stream_loss(model, ids, ans, torch.ones_like(ans), mask, eos, b)
    assert torch.isfinite(loss)
    x, logits = seen["x"], seen["logits"]
    assert x.shape[1] == P + 2 * 12 and (x[0, P + 2 * 8:] == mask).all()  # row 0 cut to 2 blocks, then padding
    checked = 0
    for r, Lr in ((0, 8), (1, 12)):
        assert torch.equal(x[r, P:P + Lr], ids[r, P:P + Lr])  # the clean stream
        for k in range(Lr // b):
            noisy = x[r, P + Lr + k * b:P + Lr + (k + 1) * b]
            canvas = torch.cat([ids[r, :P + k * b], noisy])[None]
            n = canvas.shape[1]
            view = torch.zeros(1, n, n, dtype=torch.bool)
            view[0, :, :P] = True
            for j in range(P, n):
                bj = (j - P) // b
                view[0, j, P:P + min(bj + 1, k) * b] = True
                if bj == k:
                    view[0, j, P + k * b:] = True
            ref = forward(canvas, attention_mask=view).logits[0, -b:]
            assert torch.allclose(ref, logits[r, P + Lr + k * b:P + Lr + (k + 1) * b], atol=1e-5)
            checked += 1
    assert checked == 5
    with pytest.raises(ValueError, match="weighting"):
        two_stream_loss(model, ids, ans, torch.ones_like(ans), mask, eos, b, weighting="sqrt")


def test_per_query_attention_mask_shape_is_checked():
    import torch

    model = _tiny_llada()
    with pytest.raises(ValueError, match="per-query attention_mask"):
        model(torch.zeros(1, 6, dtype=torch.long), attention_mask=torch.ones(1, 6, 5, dtype=torch.bool))


# ---------------------------------------------------------------- the Dream architecture (issue #18 part 6)


DREAM_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1, "max_position_embeddings": 256}


def _dream_config(tmp_path, **train):
    return _config(tmp_path, {"architecture": "dream", "model": DREAM_MODEL, "save_dtype": "bfloat16"}, **train)


def test_train_mdm_dream_saves_a_dream_directory_and_resumes(tmp_path):
    import torch

    from diffspec.api import resolve_model
    from diffspec.models.dream import DreamModel

    path = _dream_config(tmp_path, two_stream_fraction=0.5, two_stream_block=4)
    out = train_mdm(path)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["num_hidden_layers"] == 1 and raw["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, tok = resolve_model(str(out), None, "cpu", None, method="fast-dllm")
    assert isinstance(model, DreamModel) and model.config.mask_token_id == tok.token_to_id("<|mdm_mask|>")
    train_mdm(path, resume=True, max_steps=4)
    assert torch.load(tmp_path / "state" / "trainer_state.pt", weights_only=False)["step"] == 4


def test_dream_objective_scores_the_output_before_each_masked_cell():
    """Dream's loss: the masked token at i is predicted by the network's output at i - 1. Computing
    the loss from the unshifted outputs (LLaDA's indexing) gives another value."""
    import torch
    import torch.nn.functional as F

    from diffspec.models.dream import DreamConfig, DreamModel
    from diffspec.train.mdm import mdm_loss

    torch.manual_seed(0)
    model = DreamModel(DreamConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, mask_token_id=1, eos_token_id=0))
    ids = torch.randint(2, 40, (3, 12))
    ans = torch.zeros_like(ids, dtype=torch.bool)
    ans[:, 4:] = True
    att = torch.ones_like(ans)
    torch.manual_seed(1)
    loss = mdm_loss(model, ids, ans, att, mask_id=1)
    # The same draws by hand: t per row, then the mask, as mdm_loss draws them.
    torch.manual_seed(1)
    t = ((torch.arange(3) + torch.rand(3)) / 3 * (1 - 1e-3) + 1e-3)[:, None]
    masked = (torch.rand(ids.shape) < t) & ans
    raw = model(torch.where(masked, 1, ids), attention_mask=att, shift=False).logits
    def by_hand(logits):
        ce = F.cross_entropy(logits[masked], ids[masked], reduction="none")
        w = (1 / t).expand_as(ids)[masked] / ans.sum(1, keepdim=True).expand_as(ids)[masked]
        return (ce * w).sum() / 3
    shifted = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
    assert torch.allclose(loss, by_hand(shifted), atol=1e-5)
    assert not torch.allclose(loss, by_hand(raw), atol=1e-3)


def test_train_mdm_dream_config_is_checked(tmp_path):
    bad = json.loads(_dream_config(tmp_path).read_text())
    bad["model"]["d_model"] = 32  # a LLaDA key in a Dream config
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="model.d_model.*hidden_size"):
        train_mdm(tmp_path / "bad.json")
    bad = json.loads(_dream_config(tmp_path).read_text())
    bad["model"]["mask_token_id"] = 3
    (tmp_path / "bad2.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="taken from the tokenizer"):
        train_mdm(tmp_path / "bad2.json")
    bad["architecture"] = "mamba"
    (tmp_path / "bad3.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="architecture must be one of 'llada', 'dream'"):
        train_mdm(tmp_path / "bad3.json")


def test_bundled_dream_model_comes_from_its_config():
    """configs/dream-arith.json writes diffspec/assets/dream-arith: same shape, the shared tokenizer."""
    from pathlib import Path

    from diffspec.models.checkpoint import DEFAULT_DREAM_DIR, DEFAULT_MODEL_DIR, load_tokenizer, read_config
    from diffspec.models.dream import DreamConfig
    from diffspec.train.common import read_train_config

    root = Path(__file__).resolve().parents[1]
    cfg = read_train_config(root / "configs" / "dream-arith.json")
    assert cfg["architecture"] == "dream" and "init_from" not in cfg["train"]
    assert (root / cfg["out"]).resolve() == Path(DEFAULT_DREAM_DIR).resolve()
    if not (DEFAULT_DREAM_DIR / "config.json").is_file():
        pytest.skip("the bundled Dream model is not trained yet")
    bundled = DreamConfig.from_hf_dict(read_config(DEFAULT_DREAM_DIR))
    for key, value in cfg["model"].items():
        assert getattr(bundled, key) == value, key
    assert load_tokenizer(DEFAULT_DREAM_DIR).fingerprint() == load_tokenizer(DEFAULT_MODEL_DIR).fingerprint()
    assert sum(f.stat().st_size for f in DEFAULT_DREAM_DIR.iterdir()) <= 16 * 2**20


def test_two_stream_on_dream_scores_each_block_from_a_lead_copy_of_the_token_before_it():
    """A shifted network's noisy block opens with a copy of the token before it (the prompt's last
    token for block 0) at that token's position, seeing the prompt, the clean blocks before and the
    noisy block, as the output before a block sees them while it is decoded. Each block's logits
    equal a Dream forward on [prompt, clean blocks before, lead, noisy block] with those views."""
    import torch

    from diffspec.models.dream import DreamConfig, DreamModel
    from diffspec.train.mdm import two_stream_loss

    torch.manual_seed(0)
    V, mask, eos = 20, 19, 18
    model = DreamModel(DreamConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, mask_token_id=mask,
                                   eos_token_id=eos)).eval()
    seen = {}
    forward = model.forward

    def spy(x, positions=None, attention_mask=None, **kw):
        out = forward(x, positions=positions, attention_mask=attention_mask, **kw)
        seen.update(x=x, pos=positions, logits=out.logits)
        return out

    model.forward = spy
    P, L, b = 5, 12, 4
    torch.manual_seed(1)
    ids = torch.randint(0, 17, (1, P + L))
    ans = torch.zeros_like(ids, dtype=torch.bool)
    ans[:, P:] = True
    assert torch.isfinite(two_stream_loss(model, ids, ans, torch.ones_like(ans), mask, eos, b))
    x, pos, logits = seen["x"], seen["pos"], seen["logits"]
    assert x.shape[1] == P + 2 * L + L // b
    for k in range(L // b):
        c0 = P + L + k * (b + 1)  # the lead column of block k
        assert x[0, c0] == ids[0, P + k * b - 1] and pos[0, c0] == P + k * b - 1
        noisy = x[0, c0 + 1:c0 + 1 + b]
        canvas = torch.cat([ids[0, :P + k * b], x[0, c0:c0 + 1], noisy])[None]
        cpos = torch.cat([torch.arange(P + k * b), torch.tensor([P + k * b - 1]), P + k * b + torch.arange(b)])
        n = canvas.shape[1]
        view = torch.zeros(1, n, n, dtype=torch.bool)
        view[0, :, :P] = True
        for j in range(P, P + k * b):  # clean cells: the clean blocks up to their own
            view[0, j, P:P + ((j - P) // b + 1) * b] = True
        view[0, P + k * b:, P:] = True  # lead and noisy block: clean blocks before, the lead, the block
        ref = forward(canvas, positions=cpos, attention_mask=view).logits[0, -b:]
        assert torch.allclose(ref, logits[0, c0 + 1:c0 + 1 + b], atol=1e-5)
