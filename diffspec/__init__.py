"""diffspec: fast, honest inference for diffusion language models.

The public names are imported on first use, so `diffspec --help` and a bad
command line answer without loading torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["DecodeConfig", "CostMeter", "load_model", "save_model", "generate"]
__version__ = "0.1.0"

_LAZY = {"DecodeConfig": "diffspec.decoding.config", "CostMeter": "diffspec.decoding.meter",
         "load_model": "diffspec.models.checkpoint", "save_model": "diffspec.models.checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffspec' has no attribute {name!r}")


def generate(prompts: Any, model: Any = None, tokenizer: Any = None, progress: bool = False, **options: Any) -> Any:
    """Decode `prompts` (a string or list) with any method; see `diffspec.api.generate`."""
    from .api import generate as _generate

    return _generate(prompts, model=model, tokenizer=tokenizer, progress=progress, **options)
