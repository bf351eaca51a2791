"""SDAR (`model_type` "sdar": JetAstra's SDAR-1.7B/4B/8B-Chat), Qwen3 turned into a block-diffusion LM.

Read from the published `modeling_sdar.py` / `configuration_sdar.py` / `config.json` (JetAstra/SDAR,
`training/model/SDAR-4B-Chat/`), written here on the shared layers: the network is Qwen3's (q/k/v/o
projections with `attention_bias`, per-head RMSNorm `q_norm` / `k_norm` before full rotate-half RoPE,
SwiGLU MLP, `input_layernorm` / `post_attention_layernorm`, `model.embed_tokens`, `model.norm`,
`lm_head`), with transformers' Qwen3 tensor names, so a published directory loads unchanged. At
inference the attention takes a bool mask (SDPA, scale head_dim ** -0.5): the block-causal one of
its sampler (`block_size` 4 in config.json), never the causal one. Logits are not shifted: the
sampler reads the logit of each masked cell at that cell.

Special ids: `mask_token_id` (151669, `<|MASK|>`) is in config.json (else the tokenizer's
`mask_token`); the stop ids are generation_config.json's `eos_token_id` list (151645 `<|im_end|>`,
151643 `<|endoftext|>`), as the reference `generate.py` reads them, else config.json's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import check_hf_features
from .layers import DecoderLM, HFConfigNames, ModelOutput, check_attention_sizes, check_special_ids, hf_kwargs, \
    require_hf_keys
from .llada2 import masked_forward
from .tokenizer import Tokenizer

__all__ = ["SDAR_MODEL_TYPE", "SDARConfig", "SDARModel", "load_sdar", "is_sdar_config"]

SDAR_MODEL_TYPE = "sdar"


def is_sdar_config(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") == SDAR_MODEL_TYPE


@dataclass
class QwenBlockConfig(HFConfigNames):
    """The transformers Qwen fields the Qwen-based block-diffusion families share (SDAR on Qwen3,
    Fast-dLLM v2 on Qwen2.5), with a tiny model's sizes as defaults (for tests); each family adds
    its own block size and switches."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    mask_token_id: int = 1
    eos_token_id: int = 0
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class SDARConfig(QwenBlockConfig):
    attention_bias: bool = False
    block_size: int = 4
    stop_token_ids: tuple[int, ...] = ()  # every id that ends an answer (generation_config.json's list)

    def __post_init__(self) -> None:
        check_attention_sizes(self, ("block_size",))
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        check_special_ids(self, optional=("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"), apart=())
        self.stop_token_ids = tuple(self.stop_token_ids) or (self.eos_token_id,)
        for v in self.stop_token_ids:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size:
                raise ValueError(f"stop id {v!r} (eos_token_id) is outside the vocabulary ({self.vocab_size})")
        if self.mask_token_id in self.stop_token_ids:
            raise ValueError(f"mask_token_id {self.mask_token_id} is also an EOS id; they must differ")

    # Qwen3's layout switches, read by layers.DecoderLayer.from_config.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    qk_norm = True
    mlp_bias = False

    # The stop ids under the name the shared decoding code reads (the others: `HFConfigNames`).
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.stop_token_ids

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], stop_ids: Any = None) -> "SDARConfig":
        """Read SDAR's config.json (and, as `stop_ids`, generation_config.json's eos_token_id)."""
        if d.get("model_type") != SDAR_MODEL_TYPE:
            raise ValueError(f"model_type is {d.get('model_type')!r}, not {SDAR_MODEL_TYPE!r}")
        require_hf_keys(d, "SDAR")
        check_hf_features(d)  # silu only, no sliding window, plain full RoPE
        kw = hf_kwargs(cls, d, exclude=("stop_token_ids",))
        ids = stop_ids if stop_ids is not None else d.get("eos_token_id")
        if ids is not None:
            kw["stop_token_ids"] = tuple(ids) if isinstance(ids, list) else (ids,)
        return cls(**kw)


class SDARModel(DecoderLM):
    """SDAR with transformers' Qwen3 names; `forward` takes any bool mask over the keys (the sampler's
    block-causal one) and a KV-cache hook. `logits[:, i]` predicts token i."""

    logits_shifted = False
    block_causal = True

    config: SDARConfig

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                kv_cache: Any = None, output_hidden_states: bool = False) -> ModelOutput:
        """As `LLaDA2MoeModel.forward`: attention_mask (Q, K) or (B, Q, K) bool, or None for all keys."""
        return masked_forward(self, input_ids, positions, attention_mask, kv_cache, output_hidden_states,
                              self.config.head_dim)


def _stop_ids(path: Path) -> Any:
    from .dream import read_json_dict

    return read_json_dict(path / "generation_config.json").get("eos_token_id")


def load_sdar(path: str | Path, device: str | torch.device | None = "cpu",
              dtype: str | torch.dtype | None = None) -> tuple[SDARModel, Tokenizer]:
    """Load an SDAR directory (config.json, generation_config.json, sharded or single safetensors,
    tokenizer.json); names and shapes checked against the headers before any weight is read."""
    from .dream import config_from_files, load_checked, on_meta, open_checkpoint

    path, dev, dt, raw, tok = open_checkpoint(path, device, dtype, lambda path, raw: None if is_sdar_config(raw) else
                                              f"{path}/config.json has model_type {raw.get('model_type')!r}, not 'sdar'")
    cfg = config_from_files(path, raw, tok, lambda d: SDARConfig.from_hf_dict(d, stop_ids=_stop_ids(path)),
                            only=("mask_token_id", "eos_token_id"))
    return load_checked(path, on_meta(SDARModel, cfg), dt, dev, tied_head=cfg.tie_word_embeddings), tok
