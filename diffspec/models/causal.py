"""Llama / Qwen2 / Qwen3: the autoregressive (causal) target models for speculative decoding.

The three transformers layouts are one decoder (pre-norm RMSNorm, rotate-half
RoPE, grouped-query attention, SwiGLU MLP) that differ in a few switches, all
read from config.json as transformers reads them:

| model_type | q/k RMSNorm | Q/K/V bias | O bias | MLP bias |
|---|---|---|---|---|
| `llama` | no | `attention_bias` | `attention_bias` | `mlp_bias` |
| `qwen2` | no | always | never | never |
| `qwen3` | per head, before RoPE | `attention_bias` | `attention_bias` | never |

plus `head_dim` (config, else hidden_size / heads), `rope_theta`,
`rms_norm_eps` and `tie_word_embeddings` (absent means untied, as in
transformers). Parameter names mirror transformers' `*ForCausalLM`
(`model.layers.{i}.self_attn.q_proj` ...) so a real checkpoint directory loads
with `load_state_dict` and no renaming, and tests check logits against
transformers itself. The layers are `layers.DecoderLayer` (shared with Dream,
which runs them without the causal mask), built from the switches above.

The classes keep their historical names `Qwen3Config` / `Qwen3Model` (the rest
of diffspec, saved training configs and error messages use them) whatever the
model_type; `CausalConfig` / `CausalLM` are the same classes under
architecture-neutral names.

Decoding keeps keys and values in a preallocated `CausalKVCache`. Speculative
decoding needs two things from it beyond plain appending (`layer`, the
`layers.KVCacheHook` method every model's attention calls): `crop` to drop
rejected draft tokens, and `attn_mask_override` in the forward so a whole
tree of drafts can be verified in one call with a tree-shaped mask.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import (CheckpointError, _read_weights, check_hf_features, check_state, config_and_tokenizer,
                         resolve_device, resolve_dtype)
from .layers import DecoderLM, ModelOutput, check_positive_ints, rope_cos_sin
from .tokenizer import Tokenizer

__all__ = ["CAUSAL_MODEL_TYPES", "CausalConfig", "CausalLM", "Qwen3Config", "Qwen3Model", "CausalKVCache",
           "ModelOutput", "is_causal_config", "load_causal", "save_causal"]

# model_type -> the transformers class a config.json of that type names.
CAUSAL_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def is_causal_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json dict is one `load_causal` reads (by its model_type)."""
    return raw.get("model_type") in CAUSAL_MODEL_TYPES


@dataclass
class Qwen3Config:
    """The fields of a transformers Llama / Qwen2 / Qwen3 `config.json` that change the math.

    Defaults are a tiny Qwen3 for tests, except `rope_theta` and `rms_norm_eps`,
    which are transformers' own fallbacks so a config.json lacking them means
    the same thing here as there. `head_dim=None` means hidden_size // heads.
    `attention_bias` is Llama's and Qwen3's switch (biases on q/k/v/o);
    `mlp_bias` is Llama's. Qwen2's q/k/v biases follow from its model_type.
    """

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "qwen3"
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in CAUSAL_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; "
                             f"use one of {', '.join(CAUSAL_MODEL_TYPES)}")
        if self.model_type == "qwen2" and (self.attention_bias or self.mlp_bias):
            raise ValueError("a qwen2 model's biases are fixed (q/k/v yes, o/MLP no): "
                             "attention_bias and mlp_bias must stay false")
        if self.model_type == "qwen3" and self.mlp_bias:
            raise ValueError("mlp_bias is a Llama option; Qwen3's MLP has no biases")
        check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        if self.head_dim is not None:
            check_positive_ints(self, ("head_dim",))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number for rotate-half RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        for name in ("bos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ValueError(f"config {name}={tid} is outside the vocabulary ({self.vocab_size})")
        for tid in self.eos_token_ids:
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"config eos_token_id={tid} is outside the vocabulary ({self.vocab_size})")

    # What the model_type implies (see the module docstring's table).
    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple: configs give one id or a list (chat models stop on several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen3Config":
        """Read a transformers Llama / Qwen2 / Qwen3 config.json (4.x or 5.x layout); unknown keys go to `extra`.

        A config without model_type is read as Qwen3 (the original layout here).
        Features this implementation lacks (sliding windows, scaled RoPE,
        activations other than SiLU) raise instead of being ignored, because
        ignoring them would load silently wrong logits.
        """
        model_type = d.get("model_type") or "qwen3"
        if model_type not in CAUSAL_MODEL_TYPES:
            raise ValueError(f"model_type is {model_type!r}; supported: {', '.join(map(repr, CAUSAL_MODEL_TYPES))}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d or d[k] is None]
        if missing:
            raise ValueError(f"config lacks {model_type} keys {missing}")
        # use_sliding_window is a Qwen key that transformers' Llama ignores.
        rope = check_hf_features({**d, "use_sliding_window": False} if model_type == "llama" else d)

        # The switches each architecture reads; another type's switch is left in `extra`
        # (transformers ignores it too: Qwen2's q/k/v biases are fixed, Qwen3 has no mlp_bias).
        switches = {"llama": ("attention_bias", "mlp_bias"), "qwen2": (), "qwen3": ("attention_bias",)}[model_type]
        known = {f.name for f in fields(cls)} - {"extra", "model_type", "attention_bias", "mlp_bias"}
        kw: dict[str, Any] = {k: d[k] for k in (*known, *switches) if d.get(k) is not None}
        kw["model_type"] = model_type
        if "rope_theta" not in kw and rope.get("rope_theta") is not None:
            kw["rope_theta"] = rope["rope_theta"]
        # transformers' fallbacks for keys a config.json may omit.
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        kw.setdefault("tie_word_embeddings", False)
        consumed = known | set(switches) | {"model_type", "architectures", "hidden_act", "use_sliding_window",
                                            "layer_types", "rope_parameters", "rope_scaling", "sliding_window",
                                            "max_window_layers", "pretraining_tp", "partial_rotary_factor"}
        kw["extra"] = {k: v for k, v in d.items() if k not in consumed}
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers (4.x and 5.x) loads as the same `*ForCausalLM`."""
        d = dict(self.extra)
        d.update({k: v for k, v in asdict(self).items() if k != "extra"})
        d.update(
            architectures=[CAUSAL_MODEL_TYPES[self.model_type]],
            hidden_act="silu",
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        if self.model_type == "llama":
            d.update(pretraining_tp=1)
        else:
            d.update(use_sliding_window=False, sliding_window=None)
            d.pop("mlp_bias")
            if self.model_type == "qwen2":
                d.pop("attention_bias")
        return d


class CausalKVCache:
    """Preallocated keys/values (after RoPE) for every layer: (B, H_kv, max_len, D) each.

    All rows share one `length`: slots [0, length) are valid. Left padding is
    handled by the caller's `attention_mask`, not here, which keeps the cache
    a plain buffer. Preallocating avoids a torch.cat per layer per token and
    makes `crop` (rejecting draft tokens) free: it only moves `length`.

    It implements `layers.KVCacheHook`: the model calls `layer` once per layer
    during a forward (which appends), then `advance` once at the end, so every
    layer of one forward writes the same slots.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if min(num_layers, batch_size, num_kv_heads, head_dim, max_len) < 1:
            raise ValueError("CausalKVCache sizes must all be >= 1")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0

    @classmethod
    def for_model(
        cls, model: "Qwen3Model", batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> "CausalKVCache":
        """A cache shaped for `model`, on its device and (by default) in its dtype."""
        cfg = model.config
        w = model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim,
                   max_len or cfg.max_position_embeddings, device=w.device, dtype=dtype or w.dtype)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def last_n_keys(self) -> int:
        """Keys the last forward attended to: read after the forward, when `length` already counts its queries."""
        return self.length

    def layer(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append: write (B, H_kv, Q, D) at slots [length, length+Q); return views of slots [0, length+Q)."""
        end = self.length + k.shape[2]
        self.k[index][:, :, self.length:end] = k
        self.v[index][:, :, self.length:end] = v
        return self.k[index][:, :, :end], self.v[index][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more slots valid; the model calls this after all layers appended."""
        self.length += n

    def grow(self, rows: int, max_len: int) -> None:
        """`rows` more rows (empty) and room for at least `max_len` slots: a row joining a running
        batch (step-level batching) whose answer may end later than the others'."""
        extra = max(0, max_len - self.max_len)
        for bufs in (self.k, self.v):
            for i, buf in enumerate(bufs):
                B, H, T, D = buf.shape
                new = buf.new_zeros(B + rows, H, T + extra, D)
                new[:B, :, :T] = buf
                bufs[i] = new

    def drop_front(self, n: int) -> None:
        """Forget slots [0, n) of every row (no row reads them any more) and move the rest to the front:
        K/V are stored after RoPE with each row's own positions, so moving columns changes nothing."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot drop {n} slots: the cache holds {self.length} positions")
        if n:
            self.k = [buf[:, :, n:].contiguous() for buf in self.k]
            self.v = [buf[:, :, n:].contiguous() for buf in self.v]
            self.length -= n

    def select_rows(self, rows: Sequence[int] | Tensor) -> None:
        """Keep only these rows (finished rows leaving a batch); the others' slots are untouched."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.k[0].device)
        self.k = [buf[idx] for buf in self.k]
        self.v = [buf[idx] for buf in self.v]

    def crop(self, n: int) -> None:
        """Keep only the first n positions, e.g. to drop rejected draft tokens."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop the cache to {n}: it holds {self.length} positions")
        self.length = n

    def keep(self, start: int, indices: Sequence[int] | Tensor) -> None:
        """Compact after tree verification: move the K/V at absolute slots `indices` to slots
        start..start+len-1 in every layer, and keep exactly those (length = start + len).

        Slots before `start` are untouched. Tree verification appends every draft
        node; keeping only the anchor and the accepted path leaves a cache that
        looks as if those tokens had been fed one by one (their RoPE positions were
        already the path's positions).
        """
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.k[0].device).reshape(-1)
        if not 0 <= start <= self.length:
            raise ValueError(f"cannot keep from slot {start}: the cache holds {self.length} positions")
        if idx.numel() and not (int(idx.min()) >= 0 and int(idx.max()) < self.length):
            raise ValueError(f"slots {idx.tolist()} are not all in [0, {self.length})")
        end = start + idx.numel()
        if idx.numel() and int(idx[0]) == start and bool((idx.diff() == 1).all()):
            self.length = end  # a chain's accepted path already sits at start..end-1: nothing moves
            return
        for buf in (*self.k, *self.v):
            buf[:, :, start:end] = buf[:, :, idx]  # advanced indexing copies first, so overlaps are safe
        self.length = end


def build_attention_mask(
    n_query: int,
    past: int,
    attention_mask: Tensor | None,
    override: Tensor | None,
    device: torch.device,
) -> tuple[Tensor | None, bool]:
    """(bool mask broadcastable to (B, H, Q, K) or None, is_causal) for SDPA, K = past + Q.

    Query j sits in cache slot past+j. Without padding or override, the cheap
    paths apply: one query sees every key (mask None) and an empty cache uses
    SDPA's built-in causal mask. Otherwise the mask is built explicitly, and
    every query may always see its own slot: a padded query (whose keys are
    all masked) then yields finite garbage, whereas some SDPA kernels (older
    torch, some CUDA backends) return NaN for a fully masked row, which would
    be stored in the cache and leak into real rows via 0 * NaN.
    """
    n_keys = past + n_query
    if override is None and attention_mask is None:
        if n_query == 1:
            return None, False
        if past == 0:
            return None, True
    if override is not None:
        mask = override.to(torch.bool)
    else:
        q_slot = torch.arange(past, n_keys, device=device)[:, None]
        mask = torch.arange(n_keys, device=device)[None, :] <= q_slot
    if attention_mask is not None:
        mask = mask & attention_mask.to(torch.bool)[:, None, None, :]
    diag = torch.zeros(n_query, n_keys, dtype=torch.bool, device=device)
    diag[:, past:] = torch.eye(n_query, dtype=torch.bool, device=device)
    return mask | diag, False


class Qwen3Model(DecoderLM):
    """Llama / Qwen2 / Qwen3 causal LM (per `config.model_type`); logit i predicts token i+1.

    The modules, init and cost model are `layers.DecoderLM`'s (shared with Dream)."""

    logits_shifted = True  # output i predicts position i+1, as in Dream-style models

    config: Qwen3Config

    def new_cache(self, batch_size: int, max_len: int | None = None) -> CausalKVCache:
        """An empty `CausalKVCache` for this model (max_len defaults to max_position_embeddings)."""
        return CausalKVCache.for_model(self, batch_size, max_len)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: CausalKVCache | None = None,
        attn_mask_override: Tensor | None = None,
        output_hidden_states: bool = False,
        hidden_layers: Sequence[int] | None = None,
        logits_mask: Tensor | None = None,
    ) -> ModelOutput:
        """Run Q new tokens, attending to themselves and to everything already in `kv_cache`.

        input_ids (B, Q). positions (Q,) or (B, Q) RoPE positions; default
        past..past+Q-1 where past = kv_cache.length (pass explicit per-row
        positions for left-padded batches). attention_mask (B, past+Q) bool over
        *keys*, True = attend, covering cached and new slots. attn_mask_override
        (B or 1, 1 or H, Q, past+Q) bool replaces the causal mask (tree
        verification); attention_mask still applies on top of it. The new K/V
        are appended to `kv_cache`, which then holds past+Q positions.

        Hidden states index like transformers': 0 is the embedding output, i is
        the output of layer i-1 (before the final norm). output_hidden_states
        returns all num_hidden_layers+1; hidden_layers returns just those
        indices (negative allowed), in the order given, and implies the former.
        logits_mask (B, Q) bool: logits of those cells only, flat (N, V) (training).
        """
        cfg = self.config
        B, Q = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        n_keys = past + Q
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache was built for batch size {kv_cache.batch_size}, got {B} rows")
            if n_keys > kv_cache.max_len:
                raise ValueError(f"kv_cache holds {past} of {kv_cache.max_len} positions; {Q} more do not fit")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, n_keys):
            raise ValueError(f"attention_mask must be (B, past+Q) = {(B, n_keys)}, got {tuple(attention_mask.shape)}")
        if attn_mask_override is not None:
            s = tuple(attn_mask_override.shape)
            if len(s) != 4 or s[0] not in (1, B) or s[1] not in (1, cfg.num_attention_heads) or s[2:] != (Q, n_keys):
                raise ValueError(f"attn_mask_override must be (B, 1 or H, Q, past+Q) = ({B}, 1, {Q}, {n_keys}), got {s}")
        if positions is None:
            positions = torch.arange(past, n_keys, device=input_ids.device)
        elif tuple(positions.shape) not in ((Q,), (B, Q)):
            raise ValueError(f"positions must be (Q,) or (B, Q) for input (B, Q) = {(B, Q)}, got {tuple(positions.shape)}")

        n_states = cfg.num_hidden_layers + 1
        wanted: list[int] = []
        if hidden_layers is not None:
            for i in hidden_layers:
                if not -n_states <= i < n_states:
                    raise ValueError(f"hidden layer index {i} is out of range for {n_states} hidden states")
                wanted.append(i % n_states)
        elif output_hidden_states:
            wanted = list(range(n_states))
        keep = set(wanted)

        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        mask, is_causal = build_attention_mask(Q, past, attention_mask, attn_mask_override, input_ids.device)
        if logits_mask is not None and tuple(logits_mask.shape) != (B, Q):
            raise ValueError(f"logits_mask must be (B, Q) = {(B, Q)}, got {tuple(logits_mask.shape)}")
        logits, states = self.run_blocks(input_ids, cos, sin, mask, is_causal, kv_cache, keep, logits_mask)
        if kv_cache is not None:
            kv_cache.advance(Q)
        hidden = tuple(states[i] for i in wanted) if hidden_layers is not None or output_hidden_states else None
        return ModelOutput(logits=logits, hidden_states=hidden)


# config.json key of a drafter saved without the embedding / LM head it shares with its target.
SHARED_EMBEDDINGS_KEY = "diffspec_shares_target_embeddings"


def share_embeddings(drafter: "Qwen3Model", target: "Qwen3Model") -> None:
    """Make `drafter` read and write tokens through `target`'s embedding (and untied LM head): the
    same tensors, frozen, so a drafter of a 49k-vocabulary target costs only its own layers."""
    d, t = drafter.config, target.config
    if (d.vocab_size, d.hidden_size) != (t.vocab_size, t.hidden_size):
        raise ValueError(f"a drafter sharing its target's embeddings needs the target's vocab_size and hidden_size "
                         f"({t.vocab_size}, {t.hidden_size}); it has ({d.vocab_size}, {d.hidden_size})")
    if d.tie_word_embeddings != t.tie_word_embeddings:
        raise ValueError("a drafter sharing its target's embeddings must tie them as the target does "
                         f"(tie_word_embeddings={t.tie_word_embeddings})")
    drafter.model.embed_tokens.weight = target.model.embed_tokens.weight  # a tied head reads it too
    target.model.embed_tokens.weight.requires_grad_(False)
    if not d.tie_word_embeddings:
        drafter.lm_head.weight = target.lm_head.weight
        target.lm_head.weight.requires_grad_(False)


def load_causal(
    path: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    embeddings_from: "Qwen3Model | None" = None,
) -> tuple[Qwen3Model, Tokenizer]:
    """Load a Hugging Face Llama / Qwen2 / Qwen3 directory (config.json, safetensors, tokenizer.json) in eval mode.

    A drafter saved with `save_causal(..., shared_embeddings=True)` has no embedding of its own:
    pass its target as `embeddings_from` (it is loaded on the target's device and dtype)."""
    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    def parse(raw: dict[str, Any]) -> Qwen3Config:
        if not is_causal_config(raw):
            raise CheckpointError(
                f"{path}/config.json is not a Llama / Qwen2 / Qwen3 config (model_type={raw.get('model_type')!r}); "
                f"the causal loader supports model_type {', '.join(map(repr, CAUSAL_MODEL_TYPES))}"
            )
        return Qwen3Config.from_hf_dict(raw)

    cfg, tok = config_and_tokenizer(path, parse, lambda c: c.vocab_size)
    shared = bool(cfg.extra.get(SHARED_EMBEDDINGS_KEY))
    if shared and embeddings_from is None:
        raise CheckpointError(f"{path} is a drafter that shares its target's embedding and LM head (not saved "
                              "with it); load it as the drafter of that target (--drafter with --model TARGET)")
    if shared:
        p = next(embeddings_from.parameters())
        dev, dt = p.device, p.dtype
    state = _read_weights(path)
    # Harmless extras some exporters write: a tied head stored twice, old RoPE buffers.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    expected = model.state_dict()
    if shared:
        expected = {k: v for k, v in expected.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    check_state(expected, state, path)
    if shared:
        share_embeddings(model, embeddings_from)  # checks the sizes; the target's tensors, not copies
    model.load_state_dict({k: v.to(device=dev, dtype=dt) for k, v in state.items()}, assign=True, strict=not shared)
    return model.to(dev).eval(), tok


def save_causal(model: Qwen3Model, tokenizer: Tokenizer, path: str | Path, dtype: torch.dtype | None = None,
                shared_embeddings: bool = False) -> Path:
    """Write config.json, model.safetensors and tokenizer.json in transformers' layout for the model's type.

    shared_embeddings: leave out the embedding and LM head (a drafter reusing its target's, see
    `share_embeddings`); config.json says so and `load_causal` then needs the target."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    skip = ("model.embed_tokens.weight", "lm_head.weight") if shared_embeddings else ()
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items() if k not in skip}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = model.config.to_hf_dict()
    if shared_embeddings:
        d[SHARED_EMBEDDINGS_KEY] = True
    (path / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    tokenizer.save(path / "tokenizer.json")
    return path


# Architecture-neutral names for the same classes.
CausalConfig = Qwen3Config
CausalLM = Qwen3Model
