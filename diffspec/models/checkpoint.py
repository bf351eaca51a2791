"""Checkpoint IO in Hugging Face layout: config.json + safetensors + tokenizer.json.

Reads single-file or sharded (`model.safetensors.index.json`) weights with
`safetensors` directly, never the network. Every failure a user can cause
(missing directory, corrupt file, weights that do not fit the config) becomes
a `CheckpointError` that names the file and what to change.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors.torch import load_file, save_file

from ..jsonio import parse_json_file
from .llada import LLaDAConfig, LLaDAModel
from .matmul import ALIGN
from .tokenizer import Tokenizer

C = TypeVar("C")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "llada-arith"
# DualDiffusion's small drafter for the bundled model (same tokenizer; about a fifth of its decoding FLOPs).
DEFAULT_DRAFTER_DIR = DEFAULT_MODEL_DIR.parent / "llada-arith-drafter"
DEFAULT_DREAM_DIR = DEFAULT_MODEL_DIR.parent / "dream-arith"  # the bundled Dream-architecture model (issue #18)
DEFAULT_BLOCK_DIR = DEFAULT_MODEL_DIR.parent / "llada2-arith"  # the bundled block-diffusion model (issue #39)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"weight shard {f} named in the index is missing")
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several unrelated error types
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from None
    # safetensors hands out views into the file's bytes at any 4-byte offset; `models.matmul.linear`
    # rounds by the weight's alignment and steps aside for an unaligned one, so give every tensor its own
    return {k: v if v.data_ptr() % ALIGN == 0 else v.clone() for k, v in state.items()}


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the model's directory (the one holding config.json), "
                              "a .gguf file, or 'smollm2'")
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model directory?")
    raw = parse_json_file(cfg_file, error=CheckpointError)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object of config keys, not {type(raw).__name__}")
    return raw


def check_hf_features(d: dict[str, Any]) -> dict[str, Any]:
    """Refuse what a transformers-layout config.json asks for and the models here lack (a
    non-SiLU activation, sliding windows, layer types other than full attention, scaled or
    partial RoPE): ignoring it would load silently wrong logits. Returns the RoPE parameters
    (transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters)."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if d.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported; only full attention is implemented")
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types {sorted(set(layer_types))} are not supported; only 'full_attention'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling / rope_parameters must be an object or null, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling (rope_type {rope_type!r}) is not supported; only plain (default) RoPE")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {d['partial_rotary_factor']} is not supported (only full RoPE)")
    return rope


def load_tokenizer(path: str | Path) -> Tokenizer:
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json")
    try:
        return Tokenizer.from_file(f)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def config_and_tokenizer(path: Path, parse: Callable[[dict[str, Any]], C],
                         embeds: Callable[[C], int]) -> tuple[C, Tokenizer]:
    """A checkpoint's parsed config and its tokenizer, checked to belong together.

    Shared by every architecture's loader so a bad config.json or a foreign
    tokenizer.json fails the same way (one CheckpointError line) whatever the model.
    """
    raw = read_config(path)
    try:
        cfg = parse(raw)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    tok = load_tokenizer(path)
    if tok.vocab_size > embeds(cfg):
        raise CheckpointError(
            f"tokenizer has {tok.vocab_size} tokens but the model embeds only {embeds(cfg)}; "
            "the tokenizer.json does not belong to this model"
        )
    return cfg, tok


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Every weight the config implies is present with its shape, and nothing else: a clear error, not a torch traceback."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {path} do not match config.json: missing {missing[:4]}{'…' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}"
        )
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(f"weight {k} has shape {tuple(state[k].shape)} but config.json implies {tuple(t.shape)}")


def load_model(
    path: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
) -> tuple[LLaDAModel, Tokenizer]:
    """Load a LLaDA-layout checkpoint (default: the bundled arith model)."""
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    def parse(raw: dict[str, Any]) -> LLaDAConfig:
        from .llada_moe import is_llada_moe_config

        if is_llada_moe_config(raw):  # the same model_type, another network
            raise CheckpointError(f"{path} is a LLaDA-MoE checkpoint, not LLaDA-8B's layout: load it with "
                                  "diffspec.models.llada_moe.load_llada_moe (or diffspec.api.load_any / --model)")
        if "d_model" not in raw:
            raise CheckpointError(
                f"{path}/config.json is not a LLaDA config (model_type={raw.get('model_type')!r}); "
                "diffspec's masked-diffusion loader expects LLaDA keys such as d_model and n_layers"
            )
        return LLaDAConfig.from_hf_dict(raw)

    cfg, tok = config_and_tokenizer(path, parse, lambda c: c.embedding_size)
    if cfg.eot_token_id is None:  # LLaDA-Instruct's config.json omits it; its tokenizer names it
        eot = tok.token_to_id("<|eot_id|>")
        if eot is not None and eot < cfg.embedding_size:
            cfg.eot_token_id = eot
    state = _read_weights(path)
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    expected = model.state_dict()
    check_state(expected, state, path)
    model.load_state_dict({k: v.to(dt) for k, v in state.items()}, assign=True)
    return model.to(dev).eval(), tok


def save_model(model: LLaDAModel, tokenizer: Tokenizer, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors and tokenizer.json (LLaDA layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.weight_tying:
        state.pop("model.transformer.ff_out.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    tokenizer.save(path / "tokenizer.json")
    return path


_SAMPLE = 4096  # values read from each weight tensor: enough to tell two checkpoints apart cheaply


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape and dtype and a strided sample of its values.

    Hashing every byte of a 135M-parameter model costs seconds; a strided sample of each tensor
    still changes when any checkpoint is swapped, retrained or cast to another dtype."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
