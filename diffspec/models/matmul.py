"""`linear`: x @ Wᵀ on the CPU by the kernel that is fastest for the number of rows going through it.

At batch 1 a decoding forward sends 1–64 rows through each weight (one token for AR, a drafted block
for a speculative verification), and on the CPU that matmul is bound by reading the weight from
memory. PyTorch's `F.linear` computes it as x · Wᵀ with MKL; for so few rows MKL streams the weight at
about 10 GB/s on this project's 2-core EPYC, and handles 2–3 rows worse than 1. Three kernels, by rows
(measured on SmolLM2-135M's weights, `benchmarks/verify-cost-cpu`):

- **weight-left** (1–2 rows): W · xᵀ with one row padded to two streams the weight at about
  30 GB/s: the 30 blocks' matmuls at one row 35.9 → 18.6 ms (two threads), the LM head 9.6 → 3.8.
  It grows with the rows, though: 29.8 ms at five rows, 48.0 at sixteen.
- **packed** (3 rows up to PACKED_MAX_ROWS): oneDNN's inner product on a copy of W reordered once
  into its blocked layout (`torch.ops.mkldnn`, what torch.compile's CPU freezing uses). Its cost
  hardly grows with the rows: the blocks at five rows 22.7 ms and at sixteen 31.9 (two threads; one
  thread: 31.4 and 52.8 against weight-left's 51.7 and 91.0). A speculative verification is then
  not much dearer than a one-token forward, which is what lets speculation pay on a CPU. The copy
  is made on first use, kept beside the weight (a weak reference: it goes with the weight) and
  remade when the weight changes; it doubles a float32 model's weight memory, so it stops at
  PACKED_MAX_BYTES in all (then F.linear serves). `DIFFSPEC_PACKED_MATMUL=0` turns it off.
- **F.linear** above that.

Only the summation order inside each dot product differs between kernels (about 1e-6 relative); each
gives the same output for the same input every time, with or without autograd (the packed kernel has
no backward of its own: `_PackedLinear` supplies the plain one). CUDA and dtypes other than float32
take `F.linear` unchanged.
"""
from __future__ import annotations

import os
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

ALIGN = 16  # bytes: the BLAS rounds W · xᵀ by where W starts modulo 16 (tests/test_matmul.py)
# The row counts where each kernel wins (benchmarks/verify-cost-cpu, one and two threads alike):
# weight-left up to MAX_ROWS, the packed kernel from there to PACKED_MAX_ROWS (the largest measured;
# it still won there), F.linear above.
MAX_ROWS = 2
PACKED_MAX_ROWS = 128
PACKED_MAX_BYTES = 8 << 30  # the reordered copies, all weights together
KERNELS = ("f_linear", "weight_left", "packed")


def packed_enabled(setting: str | None) -> bool:
    """Whether the packed kernel may run, from DIFFSPEC_PACKED_MATMUL ("1" or unset: on, "0": off):
    it needs oneDNN, and was measured on x86 only."""
    if setting not in (None, "", "0", "1"):
        raise ValueError(f"DIFFSPEC_PACKED_MATMUL must be 0 (off) or 1 (on, the default), got {setting!r}")
    return (setting != "0" and torch.backends.mkldnn.is_available()
            and platform.machine().lower() in ("x86_64", "amd64"))


_PACKED_OK = packed_enabled(os.environ.get("DIFFSPEC_PACKED_MATMUL"))
_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> (its _version, reordered copy)


def _packable(weight: Tensor) -> bool:
    """An inference-mode tensor has no version counter, so its copy could not follow it."""
    return _PACKED_OK and not weight.is_inference()


def few_rows_cheap(device: torch.device) -> bool:
    """Whether a product over a few rows (3-15) costs less than one over 16 on `device`: on the GPU,
    and on the CPU with the packed kernel. Without it MKL's 3-15-row path is slower than 16 rows
    (benchmarks/verify-cost-cpu, F.linear), so a caller computing logits for a few cells does
    better to run the whole window."""
    return device.type != "cpu" or _PACKED_OK


def kernel(x: Tensor, weight: Tensor) -> str:
    """Which kernel `linear` runs for this call: "weight_left", "packed" or "f_linear". Only float32
    on the CPU leaves F.linear. The BLAS rounds W · xᵀ differently for a weight at another offset (a
    view into a safetensors file's bytes): such a weight never takes weight-left, so the same weights
    give the same output wherever they sit (`checkpoint._read_weights` aligns what it loads).
    Autograd does not decide it, so a model gives the same output with and without gradients."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2:
        return "f_linear"
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= 0:
        return "f_linear"
    if rows <= MAX_ROWS:
        return "weight_left" if weight.data_ptr() % ALIGN == 0 else "f_linear"
    return "packed" if rows <= PACKED_MAX_ROWS and _packable(weight) else "f_linear"


def packed_weight(weight: Tensor) -> Tensor | None:
    """`weight` reordered for oneDNN's inner product, made once per weight and version; None where the
    kernel cannot run or the copies would pass PACKED_MAX_BYTES."""
    if not _packable(weight):
        return None
    hit = _PACKED.get(weight)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    if hit is None and sum(w.numel() * w.element_size() for w in _PACKED.keys()) + \
            weight.numel() * weight.element_size() > PACKED_MAX_BYTES:
        return None
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    _PACKED[weight] = (weight._version, packed)
    return packed


class _PackedLinear(torch.autograd.Function):
    """x · Wᵀ through the reordered weight, with the plain backward the oneDNN op lacks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, packed: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        gw = grad.t() @ x if ctx.needs_input_grad[1] else None
        return gx, gw, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), faster for a few float32 rows on the CPU (see the module docstring)."""
    return linear_by("f_linear" if x.dim() == 0 else kernel(x, weight), x, weight, bias)


def linear_by(how: str, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x · Wᵀ (+ bias) by the kernel named `how` ("weight_left", "packed", "f_linear"), whatever the
    rows: `linear`'s choice, or a benchmark's (`bench.verify_cost` times each kernel)."""
    if how not in KERNELS:
        raise ValueError(f"unknown matmul kernel {how!r}; use one of {', '.join(KERNELS)}")
    packed = packed_weight(weight) if how == "packed" else None
    if how == "f_linear" or x.dim() == 0 or (how == "packed" and packed is None):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # a strided xᵀ sends the BLAS down its slow path
    n = rows.shape[0]
    if packed is not None:
        grad = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
        y = _PackedLinear.apply(rows, weight, packed) if grad else \
            torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
    else:
        if n == 1:
            rows = rows.expand(2, -1).contiguous()
        y = torch.mm(weight, rows.t()).t()[:n].contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear through `linear` (same parameters and checkpoint names)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
