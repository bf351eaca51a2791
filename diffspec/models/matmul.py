"""`linear`: x @ Wᵀ, with the weight as the left operand when only a few rows go through it on the CPU.

At batch 1 a decoding forward sends 1–64 rows through each weight, and on the CPU that matmul is
bound by reading the weight from memory. PyTorch's `F.linear` computes it as x · Wᵀ (the weight as
the transposed right operand); for so few rows the BLAS then streams the weight at about 10 GB/s on
this project's 2-core EPYC, and handles 2–3 rows worse than 1. Computed as W · xᵀ, the same product
streams at about 30 GB/s, and one row, padded to two, avoids the matrix-vector path, which is as slow
as `F.linear`. Measured on SmolLM2-135M's weights (`benchmarks/verify-cost-cpu`, two threads): the
30 blocks' matmuls at one row 37.3 → 17.2 ms, at two 56.1 → 16.3 ms, at five 57.6 → 31.1 ms; the
49k-row LM head at one row 10.3 → 4.3 ms, at five 19.1 → 6.6 ms; at 128 rows the two agree. With one
thread W · xᵀ wins up to 5 rows only (blocks at one row 37.1 → 28.1 ms; at eight rows 55.8 → 69.0 ms
in a run without the cut, NOTE.md there), so the cut depends on it.

Only the summation order inside each dot product can differ from `F.linear` (about 1e-6 relative), as
it already does between row counts; the same input gives the same output every time, with or without
autograd. CUDA and dtypes other than float32 take `F.linear` unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ALIGN = 16  # bytes: the BLAS rounds W · xᵀ by where W starts modulo 16 (tests/test_matmul.py)
# Above these F.linear is as fast or faster (benchmarks/verify-cost-cpu): on one thread the BLAS
# parallelises nothing and W · xᵀ loses from 8 rows on; on two it wins up to 64.
MAX_ROWS = 64
MAX_ROWS_ONE_THREAD = 5


def weight_left(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` computes W · xᵀ for this call: float32 on the CPU, few rows, a weight on a
    16-byte boundary. The BLAS rounds W · xᵀ differently for a weight at another offset (a view into
    a safetensors file's bytes): such a weight takes F.linear, so the same weights give the same
    output wherever they sit (`checkpoint._read_weights` aligns what it loads). Autograd does not
    decide it, so a model gives the same output with and without gradients."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if weight.data_ptr() % ALIGN:
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return 0 < rows <= (MAX_ROWS if torch.get_num_threads() > 1 else MAX_ROWS_ONE_THREAD)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), faster for a few float32 rows on the CPU (see the module docstring)."""
    if x.dim() == 0 or not weight_left(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # a strided xᵀ sends the BLAS down its slow path
    n = rows.shape[0]
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
