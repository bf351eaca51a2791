"""A roofline latency MODEL: what a row's forwards would take on one H100 at LLaDA-8B's shapes.

This is a model, not a measurement. The bundled models are 3.5 M parameters on a 2-core CPU; users
run LLaDA-8B on a GPU, where a forward's time is not proportional to its FLOPs: a 32-query forward
of an 8 B model at batch 1 streams 15 GB of weights and is bound by memory bandwidth, a 256-query
one is bound by arithmetic. So a method's forwards are re-priced one shape at a time. The meter
counts every forward by (batch B, query tokens Q, keys K) per model (`ModelCost.shapes`); each is
given the time

    max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)
    FLOPs = 2·P·B·Q + 4·L·d·B·Q·K           (weights, then attention scores and mixing)
    bytes = 2·P + 2·(2·L·d)·B·max(K − Q, 0)  (bf16 weights once, plus the cached keys and values read)

at the reference model's P (matmul parameters, LM head included), L layers and width d. A model
smaller than the row's primary one (a small drafter) is the reference scaled by its parameter
ratio (P, and d·L in the attention terms, times the ratio). Peak numbers are vendor peaks, so the
result is a lower bound: real kernels reach perhaps 60-80 % of either roof, and launch and host
overhead (a few µs a kernel) are not in it. It ranks methods the way a GPU would, which the CPU's
wall clock cannot; `benchmarks/gpu/run.sh` compares it with measured times when a GPU is lent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Reference:
    """A transformer's shapes: the model whose latency is predicted."""

    name: str
    layers: int
    d_model: int
    mlp_hidden: int
    vocab: int

    @property
    def params(self) -> float:
        """Matmul parameters: attention (4·d²) and SwiGLU MLP (3·d·h) per layer, plus the LM head."""
        return self.layers * (4 * self.d_model ** 2 + 3 * self.d_model * self.mlp_hidden) + self.vocab * self.d_model


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    bandwidth: float  # HBM bytes/s


# GSAI-ML/LLaDA-8B-Instruct (shared/DESIGN.md): 32 layers, d 4096, MLP 12288, vocabulary 126464.
LLADA_8B = Reference("LLaDA-8B", layers=32, d_model=4096, mlp_hidden=12288, vocab=126464)
# NVIDIA H100 SXM5: 989 TFLOP/s dense bf16 (1979 with sparsity), 3.35 TB/s HBM3.
H100 = Device("H100 SXM (989 TFLOP/s bf16 dense, 3.35 TB/s HBM3)", peak_flops=989e12, bandwidth=3.35e12)
BYTES = 2  # bf16


def forward_seconds(B: int, Q: int, K: int, ref: Reference = LLADA_8B, device: Device = H100,
                    scale: float = 1.0) -> float:
    """Roofline time of one forward of B rows × Q queries over K keys, at `scale` × the reference's size."""
    if min(B, Q, K) < 1 or scale <= 0:
        raise ValueError(f"a forward needs B, Q, K >= 1 and scale > 0; got {B}, {Q}, {K}, {scale}")
    P = ref.params * scale
    width = ref.layers * ref.d_model * scale
    flops = 2.0 * P * B * Q + 4.0 * width * B * Q * K
    nbytes = BYTES * P + BYTES * 2 * width * B * max(K - Q, 0)
    return max(flops / device.peak_flops, nbytes / device.bandwidth)


def parse_shape(key: str) -> tuple[int, int, int]:
    b, q, k = (int(x) for x in key.split(","))
    return b, q, k


def row_seconds(models: Mapping[str, Mapping[str, Any]], primary: str, ref: Reference = LLADA_8B,
                device: Device = H100) -> float | None:
    """Modelled seconds of all of a row's forwards (its meter's `models`), or None when the row was
    measured before forwards were counted by shape. The primary model (verifier / target) is the
    reference; another model is scaled by its parameter count relative to the primary's."""
    if primary not in models or not all(m.get("shapes") for m in models.values() if m.get("nfe")):
        return None
    base = models[primary].get("params") or 0
    total = 0.0
    for name, m in models.items():
        scale = 1.0 if name == primary or not base or not m.get("params") else m["params"] / base
        for key, n in m.get("shapes", {}).items():
            total += n * forward_seconds(*parse_shape(key), ref=ref, device=device, scale=scale)
    return total


def seconds_per_answer(result: Mapping[str, Any], ref: Reference = LLADA_8B, device: Device = H100) -> float | None:
    """A bench/eval row's modelled seconds per answer (None without shape counts)."""
    total = row_seconds(result.get("models", {}), result.get("primary", "model"), ref, device)
    n = result.get("sequences") or 0
    return None if total is None or not n else total / n
