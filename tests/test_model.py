"""LLaDA model: logit parity with transformers' LlamaModel under full bidirectional attention."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffspec.models.checkpoint import save_model
from diffspec.models.llada import LLaDAConfig

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaModel  # noqa: E402

TOL = 1e-4

_BLOCK_NAMES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}


def llada_to_llama_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rename a LLaDA state dict to LlamaModel names; returns (body, lm_head weight)."""
    out, head = {}, None
    for name, t in state.items():
        assert name.startswith("model.transformer."), name
        rest = name[len("model.transformer."):]
        if rest == "wte.weight":
            out["embed_tokens.weight"] = t
        elif rest == "ln_f.weight":
            out["norm.weight"] = t
        elif rest == "ff_out.weight":
            head = t
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.weight", rest)
            assert m, f"unexpected weight {name}"
            out[f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"] = t
    assert head is not None
    return out, head


def llama_from_safetensors(ckpt: Path, cfg: LLaDAConfig) -> tuple[LlamaModel, nn.Linear]:
    """Build transformers' LlamaModel + LM head and load them from diffspec's safetensors file."""
    lcfg = LlamaConfig(
        vocab_size=cfg.embedding_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_sequence_length,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        tie_word_embeddings=False,
    )
    lcfg._attn_implementation = "eager"
    body, head_w = llada_to_llama_names(load_file(str(ckpt / "model.safetensors")))
    llama = LlamaModel(lcfg).float().eval()
    missing, unexpected = llama.load_state_dict(body, strict=False)
    # rotary inv_freq is a non-persistent buffer in some versions, a state-dict entry in others
    assert not [k for k in missing if "rotary" not in k], missing
    assert not unexpected, unexpected
    head = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
    head.weight.data.copy_(head_w)
    return llama, head.eval()


def bidirectional_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool keys-to-attend -> (B, 1, T, T) additive float mask; no causal triangle."""
    B, T = keep.shape
    m = torch.zeros(B, 1, T, T)
    return m.masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)


@torch.no_grad()
def llama_logits(llama: LlamaModel, head: nn.Linear, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    if keep is None:
        keep = torch.ones_like(ids, dtype=torch.bool)
    h = llama(input_ids=ids, attention_mask=bidirectional_mask(keep)).last_hidden_state
    return head(h)


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def parity_pair(request, make_model, tokenizer, tmp_path):
    model = make_model(seed=11, n_kv_heads=request.param)
    ckpt = save_model(model, tokenizer, tmp_path / "ckpt")
    llama, head = llama_from_safetensors(ckpt, model.config)
    return model, llama, head


def test_parity_with_llama_full_attention(parity_pair):
    model, llama, head = parity_pair
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        ours = model(ids).logits
    ref = llama_logits(llama, head, ids)
    assert ours.shape == ref.shape == (2, 23, model.config.vocab_size)
    assert (ours - ref).abs().max().item() <= TOL


def test_parity_reference_is_really_bidirectional(parity_pair):
    """Changing the LAST token must change the FIRST position's logits in both models."""
    model, llama, head = parity_pair
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, 17))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        ours1, ours2 = model(ids).logits, model(ids2).logits
    ref1, ref2 = llama_logits(llama, head, ids), llama_logits(llama, head, ids2)
    assert (ref1[0, 0] - ref2[0, 0]).abs().max() > 1e-3, "reference Llama is still causal"
    assert (ours1[0, 0] - ours2[0, 0]).abs().max() > 1e-3, "diffspec LLaDA is not bidirectional"
    assert (ours2 - ref2).abs().max().item() <= TOL


def test_parity_left_padded_batch(parity_pair):
    model, llama, head = parity_pair
    torch.manual_seed(3)
    T, lengths = 20, [20, 13, 6]
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), T))
    keep = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, T - n:] = True
        ids[i, : T - n] = model.config.pad_token_id
    with torch.no_grad():
        ours = model(ids, attention_mask=keep).logits
    ref = llama_logits(llama, head, ids, keep)
    assert torch.isfinite(ours).all()
    assert (ours[keep] - ref[keep]).abs().max().item() <= TOL


def test_padding_is_invisible(tiny_model):
    """A left-padded row gives the same logits as the prompt alone (RoPE is relative)."""
    torch.manual_seed(4)
    V = tiny_model.config.vocab_size
    short = torch.randint(2, V, (1, 9))
    long_ = torch.randint(2, V, (1, 15))
    ids = torch.cat([torch.cat([torch.full((1, 6), tiny_model.config.pad_token_id), short], 1), long_])
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, :6] = False
    with torch.no_grad():
        batched = tiny_model(ids, attention_mask=keep).logits
        alone = tiny_model(short).logits
        alone_long = tiny_model(long_).logits
    assert (batched[0, 6:] - alone[0]).abs().max().item() <= TOL
    assert (batched[1] - alone_long[0]).abs().max().item() <= TOL


def test_explicit_positions_match_default(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 10))
    with torch.no_grad():
        a = tiny_model(ids).logits
        b = tiny_model(ids, positions=torch.arange(10)).logits
        c = tiny_model(ids, positions=torch.arange(10).expand(2, 10)).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_hidden_states_and_shapes(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 7))
    with torch.no_grad():
        out = tiny_model(ids, output_hidden_states=True)
    cfg = tiny_model.config
    assert out.logits.shape == (3, 7, cfg.embedding_size)
    assert len(out.hidden_states) == cfg.n_layers + 1
    assert all(h.shape == (3, 7, cfg.d_model) for h in out.hidden_states)
    assert tiny_model.logits_shifted is False


def test_weight_tying_uses_embedding_as_head(make_model):
    model = make_model(seed=5, weight_tying=True)
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        h = model.transformer.ln_f(out.hidden_states[-1])
    torch.testing.assert_close(out.logits, h @ model.transformer.wte.weight.T)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=66), "divisible by n_heads"),
        (dict(n_kv_heads=3), "divisible by n_kv_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(mask_token_id=300), "mask_token_id"),
    ],
)
def test_config_validation(make_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


def test_config_hf_dict_roundtrip(make_config):
    cfg = make_config(n_kv_heads=2)
    d = cfg.to_hf_dict()
    assert d["model_type"] == "llada" and d["d_model"] == 64 and d["n_kv_heads"] == 2
    back = LLaDAConfig.from_hf_dict(d)
    for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
              "rope_theta", "rms_norm_eps", "max_sequence_length", "mask_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(back, k) == getattr(cfg, k), k


def test_config_from_real_llada_keys():
    """The keys of GSAI-ML/LLaDA-8B-Base's config.json (subset) map onto LLaDAConfig."""
    d = {
        "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
        "mlp_ratio": 4, "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
        "pad_token_id": 126081, "weight_tying": False, "include_bias": False, "block_type": "llama",
    }
    cfg = LLaDAConfig.from_hf_dict(d)
    assert cfg.head_dim == 128 and cfg.mlp_hidden_size == 12288 and cfg.mask_token_id == 126336
    assert cfg.extra["block_type"] == "llama"
    no_kv = {k: v for k, v in d.items() if k not in ("n_kv_heads", "mlp_hidden_size")}
    cfg2 = LLaDAConfig.from_hf_dict(no_kv)
    assert cfg2.n_kv_heads == 32 and cfg2.mlp_hidden_size == 4 * 4096
    with pytest.raises(ValueError, match="LLaDA"):
        LLaDAConfig.from_hf_dict({"hidden_size": 64})
