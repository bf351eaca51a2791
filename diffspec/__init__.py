"""diffspec: fast, honest inference for diffusion language models."""
from .decoding.config import DecodeConfig
from .decoding.meter import CostMeter
from .models.checkpoint import load_model, save_model

__all__ = ["DecodeConfig", "CostMeter", "load_model", "save_model", "generate"]
__version__ = "0.1.0"


def generate(prompts, model=None, tokenizer=None, progress: bool = False, **options):
    """Decode `prompts` (a string or list) with any method; see `diffspec.api.generate`."""
    from .api import generate as _generate

    return _generate(prompts, model=model, tokenizer=tokenizer, progress=progress, **options)
