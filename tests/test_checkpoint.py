"""Checkpoint IO: roundtrip, dtypes, sharded weights and the errors a user can cause."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffspec.models.checkpoint import (
    CheckpointError,
    load_model,
    load_tokenizer,
    read_config,
    resolve_device,
    resolve_dtype,
    save_model,
)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def ids(tiny_model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, tiny_model.config.vocab_size, (2, 19), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_roundtrip_identical_logits(tiny_checkpoint, tiny_model, tokenizer, ids):
    assert {p.name for p in tiny_checkpoint.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    model, tok = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(logits(model, ids), logits(tiny_model, ids))
    assert tok.vocab_size == tokenizer.vocab_size
    assert tok.encode("Tom has 12 pens.") == tokenizer.encode("Tom has 12 pens.")
    for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mask_token_id", "eos_token_id", "rope_theta"):
        assert getattr(model.config, k) == getattr(tiny_model.config, k)


def test_saved_names_are_llada_layout(tiny_checkpoint, tiny_model):
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert "model.transformer.wte.weight" in state
    assert "model.transformer.blocks.0.attn_out.weight" in state
    assert "model.transformer.ff_out.weight" in state  # untied LM head
    assert set(state) == set(tiny_model.state_dict())
    cfg = read_config(tiny_checkpoint)
    assert cfg["model_type"] == "llada" and cfg["d_model"] == tiny_model.config.d_model


@pytest.mark.parametrize("dtype, torch_dtype, atol", [("bfloat16", torch.bfloat16, 0.1), ("fp16", torch.float16, 0.02),
                                                      (torch.bfloat16, torch.bfloat16, 0.1)])
def test_load_low_precision(tiny_checkpoint, tiny_model, ids, dtype, torch_dtype, atol):
    model, _ = load_model(tiny_checkpoint, device="cpu", dtype=dtype)
    assert all(p.dtype == torch_dtype for p in model.parameters())
    out = logits(model, ids)
    assert out.dtype == torch_dtype
    assert torch.isfinite(out).all()
    ref = logits(tiny_model, ids)
    assert (out.float() - ref).abs().max().item() < atol
    assert (out.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_save_in_bf16_then_load_fp32(tiny_model, tokenizer, tmp_path, ids):
    path = save_model(tiny_model, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_file(str(path / "model.safetensors"))["model.transformer.wte.weight"].dtype == torch.bfloat16
    model, _ = load_model(path, dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    assert (logits(model, ids) - logits(tiny_model, ids)).abs().max() < 0.1


def test_sharded_checkpoint(tiny_checkpoint, tiny_model, tmp_path, ids):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "sharded")
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("model-00001-of-00002.safetensors", names[:half]),
                        ("model-00002-of-00002.safetensors", names[half:])):
        save_file({k: state[k] for k in part}, str(path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = load_model(path)
    assert torch.equal(logits(model, ids), logits(tiny_model, ids))

    # a shard named in the index but absent is a clear error
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002.*missing"):
        load_model(path)


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def _truncate(f):
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


# (how the copied checkpoint is broken, the error it must give); each case is one broken checkpoint,
# loaded by load_model unless LOADERS names another loader
BROKEN = {
    "bad-index-json": (lambda p: (p / "model.safetensors.index.json").write_text("{not json"), "index"),
    "config-not-json": (lambda p: (p / "config.json").write_text("{oops"), "not valid JSON"),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), "safetensors"),
    "corrupt-safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"\x00\x13garbage-bytes" * 100),
                            "model.safetensors.*not a readable safetensors"),
    "truncated-safetensors": (lambda p: _truncate(p / "model.safetensors"), "not a readable safetensors"),
    "shape-mismatch": (lambda p: edit_config(p, d_model=128), "shape"),
    "layer-mismatch": (lambda p: edit_config(p, n_layers=3), "do not match config.json.*missing"),
    "invalid-config-values": (lambda p: edit_config(p, n_heads=5), "config.json.*divisible"),
    "missing-tokenizer": (lambda p: (p / "tokenizer.json").unlink(), "tokenizer.json"),
    "tokenizer-larger-than-embedding": (lambda p: edit_config(p, vocab_size=100, embedding_size=100), "tokenizer"),
    "corrupt-tokenizer": (lambda p: (p / "tokenizer.json").write_text('{"hello": 1}'), "tokenizer"),
}
LOADERS = {"corrupt-tokenizer": load_tokenizer}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_refused_with_a_clear_error(tiny_checkpoint, tmp_path, case):
    path = copy_ckpt(tiny_checkpoint, tmp_path / case)
    breakage, message = BROKEN[case]
    breakage(path)
    with pytest.raises(CheckpointError, match=message):
        LOADERS.get(case, load_model)(path)


def test_non_llada_config(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "qwen")
    (path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match="not a LLaDA config.*qwen2"):
        load_model(path)


def test_config_json_not_an_object(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "listcfg")
    (path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError):
        load_model(path)



def test_unknown_model_types_are_named_not_taken_for_llada(tiny_checkpoint, tmp_path):
    from diffspec.api import load_any

    path = copy_ckpt(tiny_checkpoint, tmp_path / "mistral")
    edit_config(path, model_type="mistral")
    for method in (None, "ar", "vanilla"):  # before: "is masked-diffusion (LLaDA); use method vanilla"
        with pytest.raises(CheckpointError, match="model_type 'mistral', which diffspec cannot load; supported"):
            load_any(path, method=method)
    drafter = Path(__file__).parents[1] / "diffspec" / "assets" / "dflash-arith"
    with pytest.raises(CheckpointError, match="is a DFlash drafter.*--drafter"):
        load_any(drafter, method="ar")
    edit_config(path, model_type="llada")
    assert load_any(path, method="vanilla")[0].config.n_layers == load_model(tiny_checkpoint)[0].config.n_layers


def test_a_file_or_a_mistyped_path_is_named(tiny_checkpoint, tmp_path):
    from diffspec.api import chat_prompts

    with pytest.raises(CheckpointError, match="model.safetensors is a file; pass the model's directory"):
        read_config(tiny_checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="model directory .*no-such-model does not exist"):
        chat_prompts(str(tmp_path / "no-such-model"), "ar", ["hi"])  # before: "pass the model as a path"


@pytest.mark.parametrize("changes, match", [
    ({"n_layers": 2.0}, "n_layers must be an integer >= 1, got 2.0"),
    ({"n_heads": "4"}, "n_heads must be an integer >= 1, got '4'"),
    ({"d_model": True}, "d_model must be an integer >= 1, got True"),
])
def test_config_shape_fields_must_be_integers(tiny_checkpoint, tmp_path, changes, match):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "types")
    edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_causal_and_dream_configs_check_types_and_rope_scaling():
    from diffspec.models.causal import CausalConfig
    from diffspec.models.checkpoint import check_hf_features
    from diffspec.models.dream import DreamConfig

    with pytest.raises(ValueError, match="num_hidden_layers must be an integer >= 1, got 1.0"):
        CausalConfig(num_hidden_layers=1.0)
    with pytest.raises(ValueError, match="head_dim must be an integer >= 1, got 16.0"):
        CausalConfig(head_dim=16.0)
    with pytest.raises(ValueError, match="num_attention_heads must be an integer >= 1, got '2'"):
        DreamConfig(num_attention_heads="2")
    with pytest.raises(ValueError, match="rope_scaling / rope_parameters must be an object or null, got 'linear'"):
        check_hf_features({"rope_scaling": "linear"})

def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "not a device"])
def test_unknown_device(device):
    with pytest.raises(ValueError, match="device"):
        resolve_device(device)


def test_unsupported_device_type():
    with pytest.raises(ValueError, match="unsupported device 'meta'.*cpu"):
        resolve_device("meta")


@pytest.mark.parametrize("dtype", ["int8", "float64", "half-ish", torch.int32, torch.float64])
def test_unknown_dtype(tiny_checkpoint, dtype):
    with pytest.raises(ValueError, match="dtype.*float32.*bfloat16.*float16"):
        load_model(tiny_checkpoint, dtype=dtype)


def test_resolve_defaults():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tiny_checkpoint):
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(tiny_checkpoint, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_fp32(tiny_checkpoint, tiny_model, ids):
    model, _ = load_model(tiny_checkpoint, device="cuda", dtype="bfloat16")
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.bfloat16
    out = logits(model, ids.cuda()).float().cpu()
    ref = logits(tiny_model, ids)
    assert (out - ref).abs().max().item() < 0.1
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    auto, _ = load_model(tiny_checkpoint, device="auto")
    assert next(auto.parameters()).dtype == torch.bfloat16 and next(auto.parameters()).is_cuda


# ---------------------------------------------------------------- tokenizer

from diffspec.models.tokenizer import EOS_TOKEN, MASK_TOKEN, SPECIAL_TOKENS, Tokenizer  # noqa: E402
from diffspec.tasks import load_examples  # noqa: E402


def test_digits_one_per_token(tokenizer):
    for text in ["12345", "Tom has 907 pens.", "48+17=65\n#### 65", "x1234567890y"]:
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text)]
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 and p.isdigit() for p in digit_pieces), pieces
        assert "".join(digit_pieces) == "".join(c for c in text if c.isdigit())


def test_roundtrip_task_text(tokenizer):
    texts = []
    for task in ("arith", "arith-mc"):
        for ex in load_examples(task, limit=20, split="validation"):
            texts += [ex.prompt, ex.solution, ex.prompt + ex.solution]
    texts += ["", " ", "  leading and trailing  ", "Question: café costs $1,200.50?\nAnswer:", "tabs\tand\n\nnewlines"]
    for s in texts:
        assert tokenizer.decode(tokenizer.encode(s)) == s


def test_special_tokens_single_ids(tokenizer):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(t) == i
        assert tokenizer.encode(t) == [i]
    ids = tokenizer.encode("Tom") + [tokenizer.token_to_id(EOS_TOKEN)]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Tom"


def test_mask_and_eos_ids_come_from_config(tiny_checkpoint, tmp_path, tokenizer):
    model, tok = load_model(tiny_checkpoint)
    assert model.config.mask_token_id == tok.token_to_id(MASK_TOKEN)
    assert model.config.eos_token_id == tok.token_to_id(EOS_TOKEN)
    assert model.config.pad_token_id == model.config.eos_token_id
    # a checkpoint decides its own ids (e.g. LLaDA's 126336 / 126081): the loader must not
    # overwrite them with whatever the tokenizer calls its mask/eos tokens
    path = copy_ckpt(tiny_checkpoint, tmp_path / "ids")
    edit_config(path, mask_token_id=250, eos_token_id=251, pad_token_id=252)
    model2, _ = load_model(path)
    assert (model2.config.mask_token_id, model2.config.eos_token_id, model2.config.pad_token_id) == (250, 251, 252)


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.fingerprint() == tokenizer.fingerprint()
    s = "Ana has 31 cups. Ana doubles them."
    assert tok.encode(s) == tokenizer.encode(s)


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": "1.0"}', b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_tokenizer_from_bad_file(tmp_path, content):
    f = tmp_path / "tokenizer.json"
    f.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(f)


def test_tokenizer_from_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.from_file(tmp_path / "absent.json")


def test_bundled_checkpoints_fit_the_size_budget():
    """Each committed checkpoint ≤ 16 MB and all together ≤ 120 MB (the developers' guide's budget, in
    decimal MB, the stricter reading)."""
    assets = Path(__file__).resolve().parents[1] / "diffspec" / "assets"
    sizes = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
             for d in assets.iterdir() if d.is_dir()}
    assert sizes, "no bundled checkpoints found"
    assert all(s <= 16_000_000 for s in sizes.values()), sizes
    assert sum(sizes.values()) <= 120_000_000, sizes
