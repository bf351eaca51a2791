"""What LLaDA2's and SDAR's block-diffusion samplers (`decoding.llada2`, `decoding.sdar`) share:
the shared options that apply to them and one way of declaring such a method."""
from __future__ import annotations

from typing import Any, Sequence

from . import Method, Option, Ref
from ._common import given_options

SHARED = ("gen_length", "block_length", "steps", "threshold", "factor", "temperature", "cache", "seed", "batch_size")
TOP_K = Option(int, "llada2 / dream: top-k filtering before sampling (default none)")
TOP_P = Option(float, "llada2 / dream: nucleus (top-p) filtering before sampling (default none)")


def block_sampler(name: str, what: str, summary: str, config: str, generate: str, options: dict[str, Option],
                  renames: dict[str, str] | None = None) -> Method:
    """A block-diffusion sampler's method: its config `diffspec.decoding.<name>:<config>` built from
    the shared options that apply and its own (`renames`: option name -> config field), run by
    `diffspec.decoding.<name>:<generate>`."""
    config_type = Ref(f"diffspec.decoding.{name}:{config}")
    generate_fn = Ref(f"diffspec.decoding.{name}:{generate}")

    def build(base: Any = None, **options_given: Any) -> Any:
        given = given_options(options_given, SHARED, options, name, what)
        if "factor" in given and "threshold" in given:
            raise ValueError(f"method {name!r} commits by --threshold or by Fast-dLLM's --factor rule; give one of them")
        for option, field in (renames or {}).items():
            if option in given:
                given[field] = given.pop(option)
        return base.replace(**given) if base is not None else config_type(**given)

    def run(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
            streamer: Any = None, meter: Any = None) -> Any:
        return generate_fn(model, tokenizer, list(prompts), cfg, progress=progress, streamer=streamer, meter=meter)

    build.__doc__ = f"{config} from the shared options that apply and its own."
    return Method(name, "diffusion", summary, build=build, config_type=(config_type,), run=run, options=options,
                  takes_block_options=False)
