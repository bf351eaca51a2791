"""Dream: a Qwen2 transformer with full (bidirectional) attention and shifted logits.

Dream-org/Dream-v0-Instruct-7B is Qwen2.5-7B turned into a masked diffusion LM.
The network is Qwen2's: q/k/v projections with biases, o_proj without, RMSNorm,
rotate-half RoPE with θ from the config, grouped-query attention, SwiGLU MLP and
an untied LM head; only the causal mask is gone. Module and parameter names are
transformers' Qwen2 names (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `post_attention_layernorm`, `model.norm`,
`lm_head`), and `DreamConfig.from_hf_dict` reads Dream's own config.json keys, so
a real Dream directory (sharded bf16 safetensors + index) loads unchanged.

**Shifted logits.** Dream keeps Qwen's next-token head: the network's output at
position i-1 predicts the token at position i (the first output is reused for
position 0, as Dream's `generation_utils.py` does with
`torch.cat([logits[:, :1], logits[:, :-1]], 1)`). `DreamModel.forward` applies
that shift itself, so its `logits[:, i]` predicts token i exactly like
`LLaDAModel`'s and a decoding loop written for LLaDA reads them unchanged.
`logits_shifted = True` says that the *network* is shifted: the logit of a column
depends on the column before it. With a KV cache that feeds a slice of columns,
the shift is taken inside the fed slice (the first fed column keeps its own
output, as Fast-dLLM's Dream code does after it commits the block's first token);
a caller that feeds non-contiguous columns passes `shift=False` and shifts with
`shift_logits` itself.

The decoder layers are `layers.DecoderLayer`, the Llama / Qwen2 / Qwen3 layer of
`causal.py` (same module and parameter names), run with `is_causal=False` and
built with Qwen2's switches (`DreamConfig.qkv_bias` ...). The KV-cache hook is
`layers.MaskedKVCacheHook` (`key_mask`, `layer`, `last_n_keys`), called exactly
as `LLaDAModel` calls it, and `DreamConfig` answers to the LLaDA field names the
decoding code reads (`n_layers`, `d_model`, `n_heads`, `n_kv_heads`,
`embedding_size`, `max_sequence_length`), so cache strategies see one surface.

**Loading without an fp32 copy.** `load_dream` builds the module on the meta
device, checks every tensor's name and shape against the safetensors *headers*
before reading any data, then reads each tensor straight from the file into
its own buffer (plain `readinto`, no mmap, so no file pages are counted against
the process), converts it to the target dtype if that differs, moves it to the
device and drops the source before reading the next one; the module then takes
the tensors with `load_state_dict(assign=True)`. Peak host memory is therefore
the weights in the target dtype plus one tensor (with a GPU target the host holds
one tensor at a time). The modules are built with torch.nn.init turned off: initialising meta
tensors imports dynamo and sympy (1.6 s, ~150 MB of RSS) for nothing.

Measured (Linux, peak RSS growth during `load_dream` on CPU, `python -m
diffspec.models.dream --measure-memory DIR`) on a random bf16 checkpoint of
1.34 GB (hidden 2048, 12 layers, GQA 16/4, vocab 32000, 3 shards):
bf16 target 1.0035× the weights' bytes (1.349 GB for 1.344 GB); fp32 target
1.04× the fp32 bytes (2.79 GB for 2.69 GB: one bf16 tensor in flight).
`tests/test_dream.py::test_loader_memory_script` repeats it on 45 MB (≤ 1.1×).
"""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint import (CheckpointError, check_hf_features, check_state, load_tokenizer, read_config, resolve_device,
                         resolve_dtype)
from .layers import DecoderLM, HFConfigNames, MaskedKVCacheHook, ModelOutput, check_attention_sizes, \
    check_special_ids, hf_kwargs, require_hf_keys
from .tokenizer import Tokenizer

__all__ = ["DreamConfig", "DreamModel", "load_dream", "save_dream", "shift_logits", "read_safetensors_headers",
           "iter_safetensors", "DREAM_AUTO_MAP"]

DREAM_AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}
# Token texts the loader looks for when config.json leaves an id out (Dream's own tokenizer names them).
_MASK_TEXTS = ("<|mask|>",)
_EOT_TEXTS = ("<|im_end|>", "<|eot_id|>")
C = TypeVar("C")
M = TypeVar("M")


@dataclass
class DreamConfig(HFConfigNames):
    """The fields of Dream's config.json that change the math, plus its special ids.

    Defaults are a tiny model for tests, except `rope_theta` and `rms_norm_eps`,
    which are Dream's own fallbacks (configuration_dream.py), so a config.json
    lacking them means the same here as there.
    """

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # Qwen2 configs have none: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    mask_token_id: int = 1
    eos_token_id: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eot_token_id: int | None = None  # <|im_end|> of the instruct model; from the tokenizer when absent
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_attention_sizes(self)
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        check_special_ids(self, optional=("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
                                          "eot_token_id"), apart=("eos_token_id", "pad_token_id"))

    # The names the LLaDA-side decoding code reads (caches, canvases, meters), beyond `HFConfigNames`.
    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size

    @property
    def weight_tying(self) -> bool:
        return self.tie_word_embeddings

    # Qwen2's fixed layout switches, read by layers.DecoderLayer.from_config (class constants,
    # not dataclass fields: no annotation): q/k/v biases, none on o_proj or the MLP, no q/k norm.
    qkv_bias = True
    o_bias = False
    qk_norm = False
    mlp_bias = False

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "DreamConfig":
        """Read Dream's config.json (model_type "Dream"); unknown keys are kept in `extra`.

        Features the architecture here lacks (sliding windows, scaled RoPE, a non-SiLU
        activation) raise instead of being ignored: ignoring them would load silently
        wrong logits. A LLaDA or autoregressive config is refused with a pointer to
        the right loader.
        """
        model_type = d.get("model_type")
        if "d_model" in d or model_type == "llada":
            raise ValueError(f"this is a LLaDA config (model_type={model_type!r}), not a Dream one; "
                             "load it with diffspec.models.checkpoint.load_model")
        if not isinstance(model_type, str) or model_type.lower() != "dream":
            raise ValueError(f"model_type is {model_type!r}, not 'Dream'"
                             + ("; an autoregressive Qwen/Llama checkpoint cannot be decoded as a masked diffusion "
                                "model (use the AR methods, which load it with load_causal)"
                                if isinstance(model_type, str) and model_type.lower() in ("qwen2", "qwen3", "llama")
                                else ""))
        require_hf_keys(d, "Dream")
        no_ids = [k for k in ("mask_token_id", "eos_token_id") if d.get(k) is None]
        if no_ids:  # Dream's remote code would assume 151666 / 151643; the ids must come from the files
            raise ValueError(f"config names no {' or '.join(no_ids)} (and the tokenizer files none either)")
        rope = check_hf_features(d)
        kw = hf_kwargs(cls, d)
        if "rope_theta" not in kw and rope.get("rope_theta") is not None:
            kw["rope_theta"] = rope["rope_theta"]
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            kw["extra"]["eos_token_ids"] = list(eos)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json in Dream's own layout (Dream's remote code and transformers read it)."""
        d: dict[str, Any] = {
            "architectures": ["DreamModel"],
            "attention_dropout": 0.0,
            "auto_map": dict(DREAM_AUTO_MAP),
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_window_layers": self.num_hidden_layers,
            "rope_scaling": None,
            "sliding_window": None,
            "use_cache": False,
            "use_sliding_window": False,
        }
        d.update(self.extra)
        eos_list = d.pop("eos_token_ids", None)
        ours = {k: v for k, v in asdict(self).items() if k != "extra"}
        if eos_list and eos_list[0] == self.eos_token_id:
            ours["eos_token_id"] = list(eos_list)  # written back as the list it was read from
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            ours.pop("head_dim")  # Qwen2 / Dream configs derive it
        if ours["eot_token_id"] is None:
            ours.pop("eot_token_id")
        if ours["bos_token_id"] is None:
            ours.pop("bos_token_id")
        d.update(ours)
        d["model_type"] = "Dream"
        return dict(sorted(d.items()))


def shift_logits(logits: Tensor) -> Tensor:
    """Dream's shift: position i takes the output at i-1; position 0 keeps its own."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class DreamModel(DecoderLM):
    """Bidirectional Qwen2 masked-diffusion LM. `forward` returns logits already shifted:
    `logits[:, i]` predicts token i, as for `LLaDAModel`. Modules, init and cost model are
    `layers.DecoderLM`'s, the causal models' (biases are initialised to zero here)."""

    logits_shifted = True  # the network predicts position i from its output at i-1 (forward undoes it)

    config: DreamConfig

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        DecoderLM._init_weights(m)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: MaskedKVCacheHook | None = None,
        output_hidden_states: bool = False,
        shift: bool = True,
    ) -> ModelOutput:
        """input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; attention_mask
        (B, K) bool over *keys* (True = attend; K = Q without a cache), or (B, Q, Q)
        per query (no cache). Returns logits (B, Q, V) with `logits[:, i]` predicting
        token i (shifted inside the fed columns; `shift=False` gives the raw outputs).
        Hidden states (embedding output, then each layer's) are never shifted."""
        # The causal models' layers, run bidirectionally.
        logits, hidden = self.bidirectional_forward(input_ids, positions, attention_mask, kv_cache,
                                                    output_hidden_states)
        if shift:
            logits = shift_logits(logits)
        return ModelOutput(logits=logits, hidden_states=hidden)


# ---------------------------------------------------------------- safetensors IO

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        out = [path / f for f in files]
        for f in out:
            if not f.is_file():
                raise CheckpointError(f"weight shard {f} named in the index is missing")
        return out
    out = sorted(path.glob("*.safetensors"))
    if not out:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return out


def _read_header(f: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data section)."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        for name, info in header.items():
            if info.get("dtype") not in _ST_DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
            itemsize = torch.empty((), dtype=_ST_DTYPES[info["dtype"]]).element_size()
            if not 0 <= begin <= end <= data_len or end - begin != numel * itemsize:
                raise ValueError(f"tensor {name} has data offsets {info['data_offsets']} that do not match "
                                 f"its shape {info['shape']} or the file size")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, struct.error) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from None
    return header, 8 + n


def read_safetensors_headers(path: str | Path) -> dict[str, tuple[Path, dict[str, Any], int]]:
    """Every tensor of a checkpoint directory (single file or sharded): name -> (file, info, data start).

    Reads only the JSON headers, so shapes can be checked before any weight is read."""
    path = Path(path)
    out: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for f in _shard_files(path):
        header, start = _read_header(f)
        for name, info in header.items():
            if name in out:
                raise CheckpointError(f"tensor {name} appears in both {out[name][0].name} and {f.name}")
            out[name] = (f, info, start)
    return out


def iter_safetensors(
    entries: dict[str, tuple[Path, dict[str, Any], int]],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) one at a time, read with plain file IO into a fresh buffer.

    Floating tensors are cast to `dtype` (when given) and moved to `device` before the
    next one is read, so at most one source-dtype tensor is alive besides the output.
    """
    by_file: dict[Path, list[tuple[str, dict[str, Any], int]]] = {}
    for name, (f, info, start) in entries.items():
        by_file.setdefault(f, []).append((name, info, start))
    for f, items in by_file.items():
        items.sort(key=lambda it: it[1]["data_offsets"][0])  # sequential reads
        with open(f, "rb", buffering=0) as fh:
            for name, info, start in items:
                begin, end = info["data_offsets"]
                buf = torch.empty(end - begin, dtype=torch.uint8)
                if end > begin:
                    fh.seek(start + begin)
                    view, got = memoryview(buf.numpy()), 0
                    while got < len(view):
                        n = fh.readinto(view[got:])
                        if not n:
                            raise CheckpointError(f"{f} ended inside tensor {name}; the file is truncated")
                        got += n
                t = buf.view(_ST_DTYPES[info["dtype"]]).reshape([int(s) for s in info["shape"]])
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                del buf
                yield name, t.to(device)


def load_checked(path: Path, model: nn.Module, dt: torch.dtype, dev: torch.device, tied_head: bool = False,
                 optional: tuple[str, ...] = ()) -> Any:
    """Assign a meta-device `model` its weights from `path`'s safetensors (single or sharded): every
    tensor name and shape checked against the headers first, then one tensor read at a time in the
    target dtype. Weights whose names end with an `optional` suffix may be absent (zeros)."""
    entries = read_safetensors_headers(path)
    # Harmless extras some exporters write: a tied head stored twice, old RoPE buffers.
    entries = {k: v for k, v in entries.items() if not k.endswith("rotary_emb.inv_freq")}
    if tied_head:
        entries.pop("lm_head.weight", None)
    expected = model.state_dict()
    shapes = {k: torch.empty([int(s) for s in info["shape"]], device="meta") for k, (_, info, _) in entries.items()}
    absent = [k for k in expected if k not in shapes and k.endswith(optional)] if optional else []
    for k in absent:
        shapes[k] = expected[k]
    check_state(expected, shapes, path)
    weights = dict(iter_safetensors(entries, dtype=dt, device=dev))
    for k in absent:
        weights[k] = torch.zeros(expected[k].shape, dtype=dt, device=dev)
    model.load_state_dict(weights, assign=True)
    return model.eval()


def read_json_dict(f: Path) -> dict[str, Any]:
    """A checkpoint's optional JSON file (tokenizer_config.json, generation_config.json): {} when
    absent or not an object."""
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _tokenizer_config(path: Path) -> dict[str, Any]:
    return read_json_dict(path / "tokenizer_config.json")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_ids_from_files(path: Path, raw: dict[str, Any], tok: Tokenizer) -> dict[str, int]:
    """Special ids config.json leaves out, looked up in tokenizer_config.json / tokenizer.json.

    config.json wins wherever it names an id (Dream's does: mask 151666, pad/EOS/BOS
    151643); otherwise tokenizer_config.json's `mask_token` / `eos_token` / `pad_token` /
    `bos_token` texts are resolved through the tokenizer; the mask falls back to
    `<|mask|>` and the end-of-turn id to `<|im_end|>` (or `<|eot_id|>`).
    """
    tcfg = _tokenizer_config(path)
    found: dict[str, int] = {}
    for key, texts in (("mask_token_id", (_token_text(tcfg.get("mask_token")), *_MASK_TEXTS)),
                       ("eos_token_id", (_token_text(tcfg.get("eos_token")),)),
                       ("pad_token_id", (_token_text(tcfg.get("pad_token")),)),
                       ("bos_token_id", (_token_text(tcfg.get("bos_token")),)),
                       ("eot_token_id", _EOT_TEXTS)):
        if raw.get(key) is not None:
            continue
        for text in texts:
            tid = tok.token_to_id(text) if text else None
            if tid is not None:
                found[key] = tid
                break
    return found


# ---------------------------------------------------------------- load / save

@contextmanager
def _no_init() -> Iterator[None]:
    """Turn torch.nn.init's functions into no-ops: the modules' own `reset_parameters` on meta
    tensors go through torch._refs and import dynamo and sympy (1.6 s and ~150 MB of RSS, once
    per process), for weights that are about to be replaced anyway."""
    names = [n for n in ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                         "kaiming_normal_", "xavier_uniform_", "xavier_normal_") if hasattr(nn.init, n)]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def on_meta(model_cls: Callable[[C], M], cfg: C) -> M:
    """`model_cls(cfg)` on the meta device, without running any init: the loaders assign real weights."""
    with _no_init(), torch.device("meta"):
        return model_cls(cfg)


def open_checkpoint(path: str | Path, device: str | torch.device | None, dtype: str | torch.dtype | None,
                    refuse: Callable[[Path, dict[str, Any]], str | None]
                    ) -> tuple[Path, torch.device, torch.dtype, dict[str, Any], Tokenizer]:
    """(path, device, dtype, config.json, tokenizer) of a checkpoint directory; `refuse(path, raw)`
    names why config.json is not one this loader reads (a CheckpointError), or None."""
    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    raw = read_config(path)
    why = refuse(path, raw)
    if why is not None:
        raise CheckpointError(why)
    return path, dev, dt, raw, load_tokenizer(path)


def config_from_files(path: Path, raw: dict[str, Any], tok: Tokenizer, parse: Callable[[dict[str, Any]], C],
                      only: tuple[str, ...] | None = None, fallback: dict[str, str] | None = None) -> C:
    """A checkpoint's config, its special ids completed from the tokenizer files
    (`special_ids_from_files`; `only` keeps those keys), then from `fallback` (id key -> the
    config.json key to take it from); a mask or EOS id found nowhere, a config `parse` refuses or a
    tokenizer larger than the embedding is one CheckpointError line."""
    ids = special_ids_from_files(path, raw, tok)
    if only is not None:
        ids = {k: v for k, v in ids.items() if k in only}
    for key, other in (fallback or {}).items():
        if raw.get(key) is None and key not in ids and raw.get(other) is not None:
            ids[key] = raw[other]
    for key in ("mask_token_id", "eos_token_id"):
        if raw.get(key) is None and key not in ids:
            raise CheckpointError(f"{path}: config.json has no {key}, and tokenizer_config.json / tokenizer.json "
                                  f"name no such token; add {key} to config.json")
    try:
        cfg = parse({**raw, **ids})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} tokens but the model embeds only {cfg.vocab_size}; "
                              "the tokenizer.json does not belong to this model")
    return cfg


def load_dream(
    path: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
) -> tuple[DreamModel, Tokenizer]:
    """Load a Dream-layout directory (config.json, single or sharded safetensors, tokenizer.json).

    dtype None / "auto": bfloat16 on CUDA, float32 on CPU (as `load_model`). Special ids come
    from config.json, else from tokenizer_config.json / tokenizer.json (never assumed); a
    config.json without a mask or EOS id anywhere is an error. Memory: see the module docstring.
    """
    path, dev, dt, raw, tok = open_checkpoint(path, device, dtype, lambda path, raw: (
        f"{path} is a LLaDA checkpoint (model_type={raw.get('model_type')!r}), not a Dream one; load it with "
        "diffspec.models.checkpoint.load_model" if "d_model" in raw or raw.get("model_type") == "llada" else None))
    cfg = config_from_files(path, raw, tok, DreamConfig.from_hf_dict)
    return load_checked(path, on_meta(DreamModel, cfg), dt, dev, tied_head=cfg.tie_word_embeddings), tok


def save_dream(model: DreamModel, tokenizer: Tokenizer | None, path: str | Path, dtype: torch.dtype | None = None,
               max_shard_bytes: int | None = None) -> Path:
    """Write config.json, safetensors weights (sharded with an index when `max_shard_bytes` is
    given and exceeded) and tokenizer.json in Dream's layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for k, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    d = model.config.to_hf_dict()
    if dtype is not None:
        d["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(dtype)
    (path / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    return path


def _measure_memory(path: str, dtype: str = "bfloat16") -> dict[str, float]:
    """Load `path` on CPU and report peak RSS growth against the weights' bytes (Linux /proc)."""
    import gc

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    gc.collect()
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model, _ = load_dream(path, device="cpu", dtype=dtype)
    peak = status("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return {"weights_bytes": weights, "peak_growth_bytes": peak - base, "ratio": (peak - base) / weights}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="measure load_dream's peak memory on a checkpoint directory")
    ap.add_argument("--measure-memory", required=True, metavar="DIR")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(json.dumps(_measure_memory(args.measure_memory, args.dtype)))
