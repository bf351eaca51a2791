"""`--compile`: the model's forward through `torch.compile` (issue #22, part 2).

Decoding calls one forward many times with shapes that change (the canvas, the cached prefix,
a verification window), so the forward is compiled with dynamic shapes and left to fall back to
eager where tracing stops (a graph break is slower, never wrong). Only the forward is compiled:
the decoding loops, the KV-cache objects and the cost meter stay plain Python, and the weights
are untouched (the same `state_dict`, so checkpoints and fingerprints do not change).

Whether it pays is measured, not assumed: `python -m diffspec.bench.gpu --decode-loop` times every
method eager and compiled on the device. On a CPU the default backend (inductor) needs a C++
compiler and takes minutes to warm up for a speed-up that tiny models cannot show; `eager`
traces without generating code (useful to check that a model traces at all).
"""
from __future__ import annotations

import torch

BACKENDS = ("inductor", "eager", "aot_eager", "cudagraphs")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown --compile backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def compile_forward(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """`model` with its forward compiled by `backend` (in place; compiling twice is a no-op)."""
    check_backend(backend)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--compile needs a torch model, got {type(model).__name__}")
    done = getattr(model, "_diffspec_compiled", None)
    if done is not None:
        if done != backend:
            raise ValueError(f"the model is already compiled with backend {done!r}; load it again to use {backend!r}")
        return model
    model.forward = torch.compile(model.forward, backend=backend, dynamic=True)  # type: ignore[method-assign]
    model._diffspec_compiled = backend  # type: ignore[assignment]
    return model


def compiled_backend(model: torch.nn.Module) -> str | None:
    """The backend `model`'s forward was compiled with, or None (eager)."""
    return getattr(model, "_diffspec_compiled", None)
