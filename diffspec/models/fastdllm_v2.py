"""Fast-dLLM v2 (`model_type` "Fast_dLLM_Qwen": Efficient-Large-Model/Fast_dLLM_v2_7B and _1.5B), Qwen2.5
turned into a block-diffusion LM.

What the network is, read from the published `configuration.py` / `modeling.py` / `config.json` of the
Hub checkpoint (`Fast_dLLM_QwenConfig`, `Fast_dLLM_QwenForCausalLM`) and NVlabs/Fast-dLLM's `v2/` folder
(`generation_functions.py`, `eval.py`, `run_chatbot.py`); written here on the shared layers:

- **Qwen2's decoder**: q/k/v projections *always* with a bias, the output projection never (the
  reference hard-codes both; config.json has no switch), no q/k norm, full rotate-half RoPE with
  `rope_theta`, grouped-query attention, SwiGLU MLP without biases, pre-norm RMSNorm
  (`input_layernorm`, `post_attention_layernorm`), `model.embed_tokens`, `model.norm`, `lm_head`
  (tied only when `tie_word_embeddings`). transformers' Qwen2 tensor names, so a published directory
  loads unchanged; `head_dim` is config.json's, else hidden_size / heads.
- **Shifted logits**: trained with the AR "token shift", the output at column i predicts token i + 1.
  `forward` shifts them back by default (`logits[:, i]` predicts token i, the first fed column keeping
  its own output, as the reference sampler's `torch.cat([logits[:, :1], logits[:, :-1]], 1)` does over
  the fed block), as `DreamModel` does; `shift=False` gives the raw outputs, whose last column is the
  AR prediction of the token after the fed ones (the sampler opens every block with it).
- **Block-causal attention at inference**: the eval path attends through SDPA with a bool mask
  (`eval_block_diff_mask`: a query in block b sees every key in blocks <= b, blocks counted from column
  0), scale head_dim ** -0.5. The model takes any bool mask; `llada2.block_causal_mask` builds that one.
  The training path (a doubled sequence under a flex-attention mask, RoPE on each half, the
  "complementary" masking of `conplemenrary_mask`) is training only and not implemented.

Special ids: config.json names `eos_token_id` (151645, `<|im_end|>`, also the reference sampler's
`stop_token` default) but no mask id: the reference hard-codes 151665, the tokenizer's added token
`|<MASK>|`, which is where the loader finds it (config.json's `mask_token_id` wins if a copy names one).
generation_config.json's second id (151643, `<|endoftext|>`) is not a stop id of the reference sampler,
so it is not one here either.

Config fields that would change the math and that the reference does not implement at inference
(sliding windows, scaled RoPE, non-SiLU activations) are refused by `checkpoint.check_hf_features`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import check_hf_features
from .dream import shift_logits
from .layers import DecoderLM, ModelOutput, check_attention_sizes, check_special_ids, hf_kwargs, \
    require_hf_keys
from .llada2 import masked_forward
from .sdar import QwenBlockConfig
from .tokenizer import Tokenizer

__all__ = ["FASTDLLM_V2_MODEL_TYPE", "FASTDLLM_V2_MASK_TEXT", "FastDLLMv2Config", "FastDLLMv2Model",
           "is_fastdllm_v2_config", "load_fastdllm_v2"]

FASTDLLM_V2_MODEL_TYPE = "Fast_dLLM_Qwen"
FASTDLLM_V2_MASK_TEXT = "|<MASK>|"  # the published tokenizer's mask token (id 151665)


def is_fastdllm_v2_config(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") == FASTDLLM_V2_MODEL_TYPE


@dataclass
class FastDLLMv2Config(QwenBlockConfig):
    """The published config.json fields that change the math, with `Fast_dLLM_QwenConfig`'s defaults
    where a config may leave one out (rope_theta 10000, rms_norm_eps 1e-6, bd_size 32). Size defaults
    are a tiny model for tests. `bd_size` is the block size the model was trained with; the sampler's
    `block_length` is its own option (the reference's `block_size`, default 32 too)."""

    max_position_embeddings: int = 32768
    bd_size: int = 32

    def __post_init__(self) -> None:
        check_attention_sizes(self, ("bd_size",))
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        check_special_ids(self, optional=("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"))

    # Qwen2's layout switches, read by layers.DecoderLayer.from_config (fixed in the reference's code).
    qkv_bias = True
    o_bias = False
    qk_norm = False
    mlp_bias = False

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end an answer: the reference sampler's single `stop_token` (config.json's EOS)."""
        return (self.eos_token_id,)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "FastDLLMv2Config":
        """Read a published Fast-dLLM v2 config.json; unknown keys (`conplemenrary_mask`, `auto_map`,
        `max_window_layers` ...) are kept in `extra`."""
        if d.get("model_type") != FASTDLLM_V2_MODEL_TYPE:
            raise ValueError(f"model_type is {d.get('model_type')!r}, not {FASTDLLM_V2_MODEL_TYPE!r}")
        require_hf_keys(d, "Fast-dLLM v2")
        check_hf_features(d)  # silu only, full attention on every layer, plain full RoPE
        return cls(**hf_kwargs(cls, d))


class FastDLLMv2Model(DecoderLM):
    """Fast-dLLM v2 with transformers' Qwen2 names; `forward` takes any bool mask over the keys (the
    sampler's block-causal one) and a KV-cache hook."""

    logits_shifted = True  # the network predicts column i from its output at i - 1 (forward undoes it)
    block_causal = True
    block_family = "Fast-dLLM v2"  # decoded by its own sampler only (`models.llada2.check_block_causal_method`)

    config: FastDLLMv2Config

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                kv_cache: Any = None, output_hidden_states: bool = False, shift: bool = True) -> ModelOutput:
        """input_ids (B, Q); positions (Q,) or (B, Q), default 0..Q-1; attention_mask a bool mask over the
        keys attended (cached keys first), (Q, K) or (B, Q, K), or None for all of them; kv_cache a
        `layers.KVCacheHook`. `shift` (default): `logits[:, i]` predicts fed token i (the first fed column
        keeps its own output); `shift=False`: the raw outputs, `logits[:, i]` predicts token i + 1."""
        out = masked_forward(self, input_ids, positions, attention_mask, kv_cache, output_hidden_states,
                             self.config.head_dim)
        if shift:
            out.logits = shift_logits(out.logits)
        return out


def parse_config(path: Path, raw: dict[str, Any], tok: Tokenizer) -> FastDLLMv2Config:
    """The config of a checkpoint directory: the mask id from config.json, else the tokenizer's
    `|<MASK>|` (the reference's hard-coded 151665), else the usual tokenizer_config.json look-up; EOS
    from config.json (else tokenizer_config.json's `eos_token`). A mask found nowhere is one
    CheckpointError line asking for `mask_token_id` in config.json."""
    from .dream import config_from_files

    if raw.get("mask_token_id") is None and tok.token_to_id(FASTDLLM_V2_MASK_TEXT) is not None:
        raw = {**raw, "mask_token_id": tok.token_to_id(FASTDLLM_V2_MASK_TEXT)}
    return config_from_files(path, raw, tok, FastDLLMv2Config.from_hf_dict, only=("mask_token_id", "eos_token_id"))


def load_fastdllm_v2(path: str | Path, device: str | torch.device | None = "cpu",
                     dtype: str | torch.dtype | None = None) -> tuple[FastDLLMv2Model, Tokenizer]:
    """Load a Fast-dLLM v2 directory (config.json, sharded or single safetensors, tokenizer.json).

    dtype None / "auto": bfloat16 on CUDA, float32 on CPU. Every tensor's name and shape is checked
    against the safetensors headers before any weight is read; then one tensor at a time is read in
    the target dtype (peak memory: the weights plus one tensor)."""
    from .dream import load_checked, on_meta, open_checkpoint

    def refuse(path: Path, raw: dict[str, Any]) -> str | None:
        return None if is_fastdllm_v2_config(raw) else (
            f"{path}/config.json has model_type {raw.get('model_type')!r}, not {FASTDLLM_V2_MODEL_TYPE!r}")

    path, dev, dt, raw, tok = open_checkpoint(path, device, dtype, refuse)
    cfg = parse_config(path, raw, tok)
    return load_checked(path, on_meta(FastDLLMv2Model, cfg), dt, dev, tied_head=cfg.tie_word_embeddings), tok
