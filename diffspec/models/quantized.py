"""`--quantize int8`: the transformer blocks' matmuls with int8 weights, on the CPU (issue #34).

At batch 1 a CPU forward streams every weight from memory once per call, so fp32 weights cost
four bytes a parameter where int8 costs one. SmolLM2's weights even arrive as 4-bit GGUF blocks and
are widened to fp32 on conversion.

`Int8Linear` stores each `nn.Linear` weight as int8 with one scale per output channel, quantizes
each token's activations to int8 with the token's own scale, multiplies in int32 (`torch._int_mm`)
and rescales. The per-token scale is what keeps speculation lossless: integer sums are exact, so a
token's output does not depend on which other tokens share the call, and a verification forward
over Q drafted tokens gives each of them the logits AR would have computed one token at a time.
PyTorch's dynamic quantization (`quantize_dynamic`, which this module used first) takes one
activation scale per call instead; on SmolLM2 that made DFlash on the int8 target match AR greedy
of the same weights on only 5 of 16 GSM8K answers (`benchmarks/int8-cpu`).

Exact matmuls are not enough. Every int8 rounding is a step, so the ~1e-6 by which fp32 attention
over Q queries differs from attention over one moves a few activations across a step, and the
steps compound through the layers: on SmolLM2 the last block's states of a 4-token verification
differed from four one-token forwards by 14.6 (logits by 1.3), where the fp32 model differs by
2e-4. So an int8 model's attention layers also get `per_row`: at batch 1 each verified query
attends on its own, over exactly the keys a one-token forward reads (`layers.attend`). The blocks'
states are then bit-identical (tests/test_quantized.py); only the fp32 LM head still rounds by
its batch, ~2e-5 in the logits, as in the fp32 model.

Only the blocks are quantized: the embedding (a lookup) and the LM head stay as they are, because
the DFlash / VP drafters read the target's embedding and head weights directly. The output changes
(an int8 model is another model), so every speculative method's losslessness is measured against
AR greedy of the same int8 weights: a bench run with `--quantize int8` quantizes the target of every
row, the AR baseline included.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layers import Attention

SCHEMES = ("int8",)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown --quantize scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


class Int8Linear(torch.nn.Module):
    """y = x Wᵀ + b with W as int8 × a per-channel scale, x as int8 × a per-token scale, int32 sums."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        token_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        q = torch.round(rows / token_scale).to(torch.int8)
        out = torch._int_mm(q, self.qweight.t()).float() * (token_scale * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_blocks(model: torch.nn.Module, scheme: str = "int8") -> torch.nn.Module:
    """`model` with every nn.Linear inside its transformer blocks replaced by an `Int8Linear`
    (in place; quantizing twice is refused)."""
    check_scheme(scheme)
    parts = getattr(model, "parts", None)
    if not callable(parts):
        raise ValueError(f"--quantize needs one of diffspec's transformer models, got {type(model).__name__}")
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"--quantize int8 runs on the CPU in float32; the model is on {weight.device.type} in "
                         f"{weight.dtype}: use --device cpu --dtype float32")
    if getattr(model, "_diffspec_quantized", None):
        raise ValueError("the model is already quantized; load it again to quantize it another way")
    if not hasattr(torch, "_int_mm"):
        raise ValueError(f"--quantize int8 needs torch._int_mm (int8 matmul, torch >= 2.2); this torch is "
                         f"{torch.__version__}")
    sizes = {True: model.num_params(), False: model.num_params(False)}  # type: ignore[operator]
    blocks = parts().blocks
    for m in list(blocks.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(m, child_name, Int8Linear(child))
        if isinstance(m, Attention):
            m.per_row = True
    # A quantized weight is no Parameter: keep the FLOP estimate's parameter count.
    model.num_params = lambda non_embedding=True: sizes[bool(non_embedding)]  # type: ignore[method-assign]
    model._diffspec_quantized = scheme  # type: ignore[assignment]
    return model


def quantized_scheme(model: torch.nn.Module) -> str | None:
    return getattr(model, "_diffspec_quantized", None)
