"""Block-diffusion training (`diffspec train block`): a block-causal LLaDA2 model on the arith tasks.

**What is trained.** A *dense* LLaDA2 (`models.llada2.LLaDA2MoeModel` with `num_experts` None: the
published `llada2_moe` layout, every layer a SwiGLU), saved with `save_llada2` so `--model DIR`
loads it with `load_llada2` and `--method llada2` (or `sdar`) decodes it with the exact block
cache. Of the two block-causal families whose samplers read the logit of cell i at i, LLaDA2 is the
one whose dense layers map *exactly* onto the bundled LLaDA's (fused q/k/v = the three projections
stacked, no q/k norm, full rotate-half RoPE): `train.init_from` a LLaDA directory warm-starts from
`llada-arith` (`llada_to_llada2`). SDAR is Qwen3, whose per-head q/k RMSNorm has no identity
setting, so a warm start could not reproduce LLaDA's logits. Routed experts are refused: the
trainer has no router balancing and a 16 MB model gains nothing from them.

**The canvas the sampler shows.** LLaDA2's and SDAR's samplers cut the canvas [prompt | answer]
into blocks of L columns counted from column 0 (prompt included); block b attends to every key in
blocks <= b; the prompt's last partial block is decoded as the first block; a block is decoded
with its answer cells partly masked while every block before it is final. So training row r, with
block length L drawn from `data.block_lengths`, scores each block b that holds answer cells on
exactly that view: block b noised (answer cells masked with probability t, prompt cells never),
the blocks before it clean. Answers stop after the block that holds their first EOS (the sampler
stops there too; the cells after that EOS in its block are EOS targets).

**Two streams (BD3-LM's vectorised training), and why.** A naive loop would run one forward per
block. Instead each row becomes [clean stream | noisy stream]:

- clean stream: columns 0 .. (last block's start) - 1 of the clean row (the last block is never a
  key of a later noisy block, so it is left out);
- noisy stream: the columns of every block from P // L on, answer cells masked; positions are the
  columns' own (the two copies of a column share its RoPE position).

`two_stream_mask` lets a clean cell see the clean cells of its block and earlier blocks, and a
noisy cell of block b see the clean cells of blocks < b and the noisy cells of block b, nothing
else (not its own block's clean copy, not another block's noisy cells, not later blocks). Every
layer then computes, for the noisy block b, exactly the hidden states of a block-causal forward
on [clean blocks < b | noisy block b], the sampler's forward (tests check logit equality against
`block_causal_mask`), and the clean stream exactly the cached K/V of finished blocks. One forward
of about twice the row's length scores all its blocks; the alternative (one forward per block, or
a clean-prefix cache per block) costs a forward per block for the same gradients.

**Loss.** Each noisy block draws its own noise level t_b ~ U(eps, 1] (`train.noise: "block"`,
BD3-LM's choice: a row mixes nearly clean and nearly masked blocks, which lowers the variance of
the estimate) or one t per row (`"example"`), stratified over the batch. "elbo" weighting sums
each masked cell's cross-entropy divided by its block's t, over the row's answer cells (the
masked-diffusion bound per block, normalised by the answer length as LLaDA's SFT loss is); "mean"
averages each row's masked cross-entropy (lower variance, another weighting).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.checkpoint import DTYPES, CheckpointError, read_config
from ..models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModel, save_llada2
from ..models.tokenizer import EOS_TOKEN, MASK_TOKEN, Tokenizer
from ..tasks import Example, score
from .common import (TOP_KEYS, TRAIN_KEYS, Derived, Schema, anything, boolean, choice, int_list, integer, number,
                     setup, shape_difference, text, train_loop)
from .mdm import TRAIN_TASKS, WEIGHTINGS, MDMBatcher, _training_data, build_tokenizer, check_choice, row_mean

__all__ = ["SCHEMA", "NOISE", "TwoStreamBatch", "two_stream_mask", "build_two_stream", "block_diffusion_loss",
           "llada_to_llada2", "llada2_model_section", "warm_start", "build_block_model", "train_block"]

NOISE = ("block", "example")
CLEAN, NOISY, PAD = 0, 1, -1  # `TwoStreamBatch.kind` of a column


class Refused(Derived):
    """A key a LLaDA2 config.json may hold but this trainer cannot honour: giving it is an error (and,
    as a `Derived` key, it is not listed among the valid ones)."""

    def __call__(self, name: str, v: Any) -> None:
        raise ValueError(f"{name}: {self.source}; drop it from the config")


_DENSE_ONLY = Refused("`diffspec train block` trains a dense LLaDA2 (no routed experts)")
_FRACTION = number(0, 1)
SCHEMA: Schema = {
    **TOP_KEYS,
    "save_dtype": choice(*DTYPES),
    # LLaDA2MoeConfig's fields that a dense model reads (the published config.json names).
    "model": {"hidden_size": integer(1), "intermediate_size": integer(1), "num_hidden_layers": integer(1),
              "num_attention_heads": integer(1), "num_key_value_heads": integer(1), "head_dim": integer(1),
              "rms_norm_eps": number(0, lo_open=True), "rope_theta": number(0, lo_open=True),
              "max_position_embeddings": integer(1), "partial_rotary_factor": number(0, 1, lo_open=True),
              "use_qk_norm": boolean, "use_qkv_bias": boolean, "use_bias": boolean, "tie_word_embeddings": boolean,
              **{k: Derived("the tokenizer") for k in ("vocab_size", "mask_token_id", "eos_token_id", "pad_token_id")},
              **{k: _DENSE_ONLY for k in ("num_experts", "moe_intermediate_size", "num_shared_experts",
                                          "num_experts_per_tok", "first_k_dense_replace")}},
    "tokenizer": {"vocab_size": integer(1), "corpus_problems": integer(1), "arith": anything},
    "data": {"task": choice(*TRAIN_TASKS), "gen_length": integer(1), "block_lengths": int_list(1),
             "pool": integer(1), "mc_fraction": _FRACTION, "mc_gen_length": integer(1), "arith": anything,
             "lines": int_list(2), "recall_fraction": _FRACTION},
    "train": {**TRAIN_KEYS, "noise": choice(*NOISE), "loss_weighting": choice(*WEIGHTINGS), "init_from": text,
              "eval_block_length": integer(1)},
}


# ---------------------------------------------------------------- the two-stream rows


@dataclass
class TwoStreamBatch:
    """Right-padded two-stream rows, (B, T) each: `x` the fed ids, `target` the clean id of every
    column, `positions` RoPE positions (a column's canvas column), `kind` CLEAN / NOISY / PAD,
    `block` the canvas block of the column, `masked` the noisy answer cells that were masked (the
    scored ones), `t` each column's noise level (noisy columns; 1 elsewhere); `n_answer` (B,) the
    answer cells of each row's noisy stream, `block_length` (B,) each row's L."""

    x: Tensor
    target: Tensor
    positions: Tensor
    kind: Tensor
    block: Tensor
    masked: Tensor
    t: Tensor
    n_answer: Tensor
    block_length: Tensor


def two_stream_mask(kind: Tensor, block: Tensor) -> Tensor:
    """(B, T, T) bool, True = query column may attend to key column (see the module docstring):
    clean -> clean keys of blocks <= its own; noisy -> clean keys of blocks < its own and noisy keys
    of its own block; padding -> itself only (an all-False row would make the softmax NaN)."""
    kq, kk = kind[:, :, None], kind[:, None, :]
    bq, bk = block[:, :, None], block[:, None, :]
    clean_key = (kk == CLEAN) & (((kq == CLEAN) & (bk <= bq)) | ((kq == NOISY) & (bk < bq)))
    own_noisy = (kq == NOISY) & (kk == NOISY) & (bk == bq)
    eye = torch.eye(kind.shape[1], dtype=torch.bool, device=kind.device)[None]
    return clean_key | own_noisy | ((kq == PAD) & eye)


def _row_canvas(ids: Tensor, ans: Tensor, eos_id: int, L: int) -> tuple[Tensor, int]:
    """(canvas, P): the row's prompt and answer up to the end of the block (from column 0) that holds
    the answer's first EOS, EOS-extended to that block's end when the padded answer stops short."""
    a_idx = ans.nonzero()[:, 0]
    if len(a_idx) == 0:
        raise ValueError("a training row has no answer cells")
    P = int(a_idx[0])
    answer = ids[ans]
    eos = (answer == eos_id).nonzero()
    if len(eos) == 0:
        raise ValueError("every answer must hold an EOS (the block trainer cuts answers after the block that "
                         "holds their first EOS, as the sampler stops there); pad answers with EOS")
    end = ((P + int(eos[0, 0])) // L + 1) * L
    canvas = torch.cat([ids[:P], answer])[:end]
    if len(canvas) < end:
        canvas = torch.cat([canvas, canvas.new_full((end - len(canvas),), eos_id)])
    return canvas, P


def _noise_levels(n_blocks: Sequence[int], noise: str, eps: float, device: torch.device) -> list[Tensor]:
    """Per row, the noise level of each of its noisy blocks: one U(eps, 1] draw per block ("block")
    or per row ("example"), stratified over the batch's draws."""
    n = sum(n_blocks) if noise == "block" else len(n_blocks)
    u = (torch.randperm(n, device=device) + torch.rand(n, device=device)) / n
    t = (1 - eps) * u + eps
    if noise == "example":
        return [t[r].expand(k) for r, k in enumerate(n_blocks)]
    return list(t.split(list(n_blocks)))


def build_two_stream(ids: Tensor, ans: Tensor, mask_id: int, eos_id: int, block_lengths: Sequence[int],
                     noise: str = "block", eps: float = 1e-3) -> TwoStreamBatch:
    """The two-stream rows of a batch of [prompt | answer + EOS padding] rows (ids, answer mask (B, T));
    each row's L is drawn from `block_lengths`, its noise levels as `noise` says (torch's RNG)."""
    check_choice("noise", noise, NOISE)
    if not block_lengths or any(isinstance(L, bool) or not isinstance(L, int) or L < 1 for L in block_lengths):
        raise ValueError(f"block_lengths must be a non-empty list of integers >= 1, got {list(block_lengths)!r}")
    dev = ids.device
    Ls = [block_lengths[int(i)] for i in torch.randint(len(block_lengths), (ids.shape[0],))]
    rows = [_row_canvas(ids[r], ans[r], eos_id, L) for r, L in enumerate(Ls)]
    first = [P // L for (_, P), L in zip(rows, Ls)]  # the first noisy block: the one holding column P
    n_blocks = [len(c) // L - b0 for (c, _), L, b0 in zip(rows, Ls, first)]
    levels = _noise_levels(n_blocks, noise, eps, dev)
    lens = [len(c) - L + len(c) - b0 * L for (c, _), L, b0 in zip(rows, Ls, first)]
    B, T = len(rows), max(lens)
    out = TwoStreamBatch(x=torch.full((B, T), mask_id, dtype=torch.long, device=dev),
                         target=torch.full((B, T), eos_id, dtype=torch.long, device=dev),
                         positions=torch.zeros((B, T), dtype=torch.long, device=dev),
                         kind=torch.full((B, T), PAD, dtype=torch.long, device=dev),
                         block=torch.zeros((B, T), dtype=torch.long, device=dev),
                         masked=torch.zeros((B, T), dtype=torch.bool, device=dev),
                         t=torch.ones((B, T), device=dev), n_answer=torch.zeros(B, device=dev),
                         block_length=torch.tensor(Ls, device=dev))
    for r, ((canvas, P), L, b0, t_blocks) in enumerate(zip(rows, Ls, first, levels)):
        C = len(canvas) - L  # clean stream: every block but the last
        col = torch.arange(len(canvas), device=dev)
        noisy_cols = col[b0 * L:]
        t_cell = t_blocks.repeat_interleave(L)
        m = (torch.rand(len(noisy_cols), device=dev) < t_cell) & (noisy_cols >= P)
        s = slice(C, C + len(noisy_cols))
        out.x[r, :C], out.x[r, s] = canvas[:C], torch.where(m, mask_id, canvas[noisy_cols])
        out.target[r, :C], out.target[r, s] = canvas[:C], canvas[noisy_cols]
        out.positions[r, :C], out.positions[r, s] = col[:C], noisy_cols
        out.kind[r, :C], out.kind[r, s] = CLEAN, NOISY
        out.block[r, :C], out.block[r, s] = col[:C] // L, noisy_cols // L
        out.masked[r, s], out.t[r, s] = m, t_cell
        out.n_answer[r] = len(canvas) - P
    return out


def two_stream_loss_of(model: torch.nn.Module, batch: TwoStreamBatch, weighting: str = "elbo") -> Tensor:
    """The masked cells' cross-entropy of one two-stream forward, weighted as `weighting` says."""
    check_choice("weighting", weighting, WEIGHTINGS)
    logits = model(batch.x, positions=batch.positions,
                   attention_mask=two_stream_mask(batch.kind, batch.block)).logits
    m = batch.masked
    if not m.any():  # nothing masked anywhere (possible only for tiny batches): a zero that keeps the graph
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[m].float(), batch.target[m], reduction="none")
    if weighting == "mean":
        return row_mean(ce, m)
    per_row = torch.zeros(m.shape[0], device=ce.device).index_add_(0, m.nonzero()[:, 0], ce / batch.t[m])
    return (per_row / batch.n_answer.clamp(min=1)).mean()


def block_diffusion_loss(model: torch.nn.Module, ids: Tensor, ans: Tensor, mask_id: int, eos_id: int,
                         block_lengths: Sequence[int], noise: str = "block", weighting: str = "elbo",
                         eps: float = 1e-3) -> Tensor:
    """The block-causal objective of one batch (see the module docstring)."""
    return two_stream_loss_of(model, build_two_stream(ids, ans, mask_id, eos_id, block_lengths, noise, eps),
                              weighting)


# ---------------------------------------------------------------- warm start from LLaDA


def llada_to_llada2(state: Mapping[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """A LLaDA state dict (`models.llada`'s names) under a dense LLaDA2's names: the fused
    query_key_value is q, k, v stacked by rows (the order in which LLaDA2 splits its heads), the
    SwiGLU's ff_proj / up_proj / ff_out are gate / up / down, the norms and head keep their roles."""
    t, out = "model.transformer.", {}
    out["model.word_embeddings.weight"] = state[t + "wte.weight"]
    for i in range(n_layers):
        b, o = f"{t}blocks.{i}.", f"model.layers.{i}."
        out[o + "attention.query_key_value.weight"] = torch.cat(
            [state[b + f"{p}_proj.weight"] for p in ("q", "k", "v")], dim=0)
        out[o + "attention.dense.weight"] = state[b + "attn_out.weight"]
        for src, dst in (("ff_proj", "gate_proj"), ("up_proj", "up_proj"), ("ff_out", "down_proj")):
            out[o + f"mlp.{dst}.weight"] = state[b + f"{src}.weight"]
        out[o + "input_layernorm.weight"] = state[b + "attn_norm.weight"]
        out[o + "post_attention_layernorm.weight"] = state[b + "ff_norm.weight"]
    out["model.norm.weight"] = state[t + "ln_f.weight"]
    if t + "ff_out.weight" in state:
        out["lm_head.weight"] = state[t + "ff_out.weight"]
    return out


def llada2_model_section(llada_cfg: Any) -> dict[str, Any]:
    """The dense LLaDA2 model section whose network equals a LLaDA config's (for `llada_to_llada2`)."""
    return {"hidden_size": llada_cfg.d_model, "intermediate_size": llada_cfg.mlp_hidden_size,
            "num_hidden_layers": llada_cfg.n_layers, "num_attention_heads": llada_cfg.n_heads,
            "num_key_value_heads": llada_cfg.n_kv_heads, "head_dim": llada_cfg.head_dim,
            "rms_norm_eps": llada_cfg.rms_norm_eps, "rope_theta": llada_cfg.rope_theta,
            "max_position_embeddings": llada_cfg.max_sequence_length, "partial_rotary_factor": 1.0,
            "use_qk_norm": False, "use_qkv_bias": False, "use_bias": False,
            "tie_word_embeddings": llada_cfg.weight_tying}


_MATH_FIELDS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "use_qk_norm", "use_qkv_bias", "use_bias",
                "tie_word_embeddings", "head_dim")


def warm_start(model: LLaDA2MoeModel, tok: Tokenizer, init_from: str, dev: str | torch.device) -> None:
    """Load `init_from` (a LLaDA directory, mapped by `llada_to_llada2`, or a LLaDA2 one) into
    `model`, refusing another tokenizer, another shape, or math that would differ (norm eps, RoPE)."""
    from ..models.checkpoint import load_model
    from ..models.llada2 import load_llada2

    try:
        model_type = read_config(init_from).get("model_type")
    except (CheckpointError, OSError) as e:
        raise ValueError(f"train.init_from {init_from}: {e}") from None
    if model_type == "llada":
        src, init_tok = load_model(init_from, device=dev, dtype=torch.float32)
        state, want = llada_to_llada2(src.state_dict(), src.config.n_layers), llada2_model_section(src.config)
    elif model_type == "llada2_moe":
        src, init_tok = load_llada2(init_from, device=dev, dtype=torch.float32)
        state, want = src.state_dict(), {k: getattr(src.config, k) for k in _MATH_FIELDS}
    else:
        raise ValueError(f"train.init_from {init_from} has model_type {model_type!r}; the block trainer warm-starts "
                         "from a LLaDA ('llada') or a LLaDA2 ('llada2_moe') checkpoint")
    if init_tok.fingerprint() != tok.fingerprint():
        raise ValueError(f"train.init_from {init_from} uses another tokenizer than this config builds; "
                         f"set tokenizer_from to {init_from}")
    for key in _MATH_FIELDS:
        if getattr(model.config, key) != want[key]:
            raise ValueError(f"train.init_from {init_from} computes with {key} = {want[key]!r}, this config's model "
                             f"section with {getattr(model.config, key)!r}; set model.{key} to {want[key]!r}")
    diff = shape_difference(state, model)
    if diff is not None:
        raise ValueError(f"train.init_from {init_from} has another model shape than this config's 'model' "
                         f"section ({diff})")
    model.load_state_dict(state)
    print(f"initialised weights from {init_from} ({model_type})")


# ---------------------------------------------------------------- the trainer


def build_block_model(model_cfg: dict[str, Any], tok: Tokenizer) -> LLaDA2MoeModel:
    """A dense LLaDA2 with the config's model section and the tokenizer's vocabulary and special ids."""
    ids = {"vocab_size": tok.vocab_size, "mask_token_id": tok.token_to_id(MASK_TOKEN),
           "eos_token_id": tok.token_to_id(EOS_TOKEN)}
    try:
        cfg = LLaDA2MoeConfig(**{**model_cfg, **ids, "num_experts": None})
    except (ValueError, TypeError) as e:
        raise ValueError(f"model section: {e}") from None
    return LLaDA2MoeModel(cfg)


def _block_options(cfg: dict[str, Any]) -> tuple[list[int], int, str, str]:
    """(block lengths, eval block length, noise, weighting), cross-checked."""
    dcfg, tr = cfg.get("data", {}), cfg["train"]
    lengths = list(dcfg.get("block_lengths", [32]))
    eval_L = int(tr.get("eval_block_length", lengths[0]))
    if eval_L not in lengths:
        raise ValueError(f"train.eval_block_length {eval_L} is not one of data.block_lengths {lengths}: validation "
                         "would decode with a block length the model is not trained on")
    return lengths, eval_L, str(tr.get("noise", "block")), str(tr.get("loss_weighting", "elbo"))


def _check_positions(batcher: MDMBatcher, lengths: Sequence[int], limit: int) -> None:
    """The longest canvas (prompt + answer, rounded up to a block) fits the model's positions."""
    longest = max(len(p) + len(a) for p, a in batcher.items) + max(lengths)
    if longest > limit:
        raise ValueError(f"the longest training canvas needs {longest} positions (prompt + answer + a block), more "
                         f"than model.max_position_embeddings {limit}; raise it or shorten data.gen_length")


def evaluate_block(model: LLaDA2MoeModel, tok: Tokenizer, examples: list[Example], gen_length: int,
                   block_length: int) -> float:
    """Exact match of the `llada2` sampler at full steps (one cell a step, block cache)."""
    from ..decoding.llada2 import LLaDA2DecodeConfig, llada2_generate

    cfg = LLaDA2DecodeConfig(gen_length=gen_length, block_length=block_length, steps=block_length, threshold=1.0,
                             batch_size=64)
    res = llada2_generate(model, tok, [e.prompt for e in examples], cfg)
    return sum(score(e, t)["correct"] for e, t in zip(examples, res.texts)) / len(examples)


def train_block(config_path: str | Path, out: str | Path | None = None, resume: bool = False,
                device: str | None = None, max_steps: int | None = None) -> Path:
    """Train a block-causal (dense LLaDA2) model from a JSON config ({model, tokenizer or
    tokenizer_from, data, train, out, state_dir, save_dtype}) and save it in LLaDA2's layout."""
    cfg, tr, out_dir, state_path, dev = setup(config_path, out, device, SCHEMA)
    lengths, eval_L, noise, weighting = _block_options(cfg)
    tok = build_tokenizer(cfg)
    eos_id, mask_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(MASK_TOKEN)
    model = build_block_model(cfg["model"], tok).to(dev)
    if tr.get("init_from"):  # weights only; a fresh optimizer
        warm_start(model, tok, tr["init_from"], dev)
    save_dtype = DTYPES[cfg["save_dtype"]] if "save_dtype" in cfg else None
    print(f"dense LLaDA2: {model.num_params() / 1e6:.2f}M non-embedding params, vocab {tok.vocab_size}, "
          f"block lengths {lengths}, device {dev}")
    gen_length = int(cfg.get("data", {}).get("gen_length", 48))
    batcher, val = _training_data(cfg, tr, tok, eos_id, gen_length)
    _check_positions(batcher, lengths, model.config.max_position_embeddings)

    def loss_fn() -> Tensor:
        ids, ans, _ = (t.to(dev) for t in batcher.next())
        return block_diffusion_loss(model, ids, ans, mask_id, eos_id, lengths, noise, weighting)

    train_loop("block", model, tr, int(max_steps or tr.get("steps", 2000)), state_path, resume, dev, loss_fn,
               lambda: {"val_accuracy": evaluate_block(model, tok, val, gen_length, eval_L)},
               lambda: save_llada2(model, tok, out_dir, save_dtype), rngs=[batcher.rng])
    return out_dir
