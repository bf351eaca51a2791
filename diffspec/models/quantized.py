"""`--quantize int8`: the transformer blocks' matmuls with int8 weights, on the CPU (issue #34).

At batch 1 a CPU forward streams every weight from memory once per call, so fp32 weights cost
four bytes a parameter where int8 costs one. SmolLM2's weights even arrive as 4-bit GGUF blocks and
are widened to fp32 on conversion. PyTorch's dynamic quantization (`quantize_dynamic`, fbgemm
kernels) stores each `nn.Linear` weight as int8 with one scale per output channel and quantizes
activations on the fly. On this 2-core AVX2 machine a SmolLM2 forward ran about 1.4× faster at Q = 1 and 1.7× at
Q = 16 under load (measured in the session that added this; `benchmarks/verify-cost-cpu` has the
curve).

Only the blocks are quantized: the embedding (a lookup) and the LM head stay as they are, because
the DFlash / VP drafters read the target's embedding and head weights directly. The output changes
(an int8 model is another model), so every speculative method's losslessness is measured against
AR greedy of the same int8 weights: a bench run with `--quantize int8` quantizes the target of every
row, the AR baseline included.

`torch.ao.quantization` is deprecated upstream in favour of torchao but still ships (and works) in
the torch this project installs; its deprecation warnings are silenced here, and if a later torch
drops it, `--quantize` fails with one clear line instead of a traceback.
"""
from __future__ import annotations

import warnings

import torch

from .matmul import Linear

SCHEMES = ("int8",)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown --quantize scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def quantize_blocks(model: torch.nn.Module, scheme: str = "int8") -> torch.nn.Module:
    """`model` with every nn.Linear inside its transformer blocks replaced by a dynamically quantized
    int8 one (in place; quantizing twice is refused)."""
    check_scheme(scheme)
    parts = getattr(model, "parts", None)
    if not callable(parts):
        raise ValueError(f"--quantize needs one of diffspec's transformer models, got {type(model).__name__}")
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"--quantize int8 runs on the CPU in float32 (PyTorch's dynamic int8 kernels); the model "
                         f"is on {weight.device.type} in {weight.dtype}: use --device cpu --dtype float32")
    if getattr(model, "_diffspec_quantized", None):
        raise ValueError("the model is already quantized; load it again to quantize it another way")
    sizes = {True: model.num_params(), False: model.num_params(False)}  # type: ignore[operator]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            for m in parts().blocks.modules():  # torch maps module types exactly: give it plain nn.Linear
                if isinstance(m, Linear):
                    m.__class__ = torch.nn.Linear
            spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
            torch.ao.quantization.quantize_dynamic(parts().blocks, spec, dtype=torch.qint8, inplace=True)
    except (AttributeError, ImportError, RuntimeError) as e:
        raise ValueError(f"--quantize int8 needs torch.ao.quantization's dynamic int8 kernels, which this torch "
                         f"({torch.__version__}) lacks: {e}") from None
    # A quantized weight is no Parameter: keep the FLOP estimate's parameter count.
    model.num_params = lambda non_embedding=True: sizes[bool(non_embedding)]  # type: ignore[method-assign]
    model._diffspec_quantized = scheme  # type: ignore[assignment]
    return model


def quantized_scheme(model: torch.nn.Module) -> str | None:
    return getattr(model, "_diffspec_quantized", None)
