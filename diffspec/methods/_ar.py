"""What the AR-target methods (ar, ar-spec, dflash, d2sd) share: one config (`ARMethodConfig`,
`speculative.armethods`), two options, one decode function per set of model roles and one way of
declaring a method."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ..options import int_or_auto, parse_bool
from . import Method, Option, Ref

COMMON = {
    "max_new_tokens": Option(int, "another name for gen_length on AR targets"),
    "stop_at_eos": Option(parse_bool, "stop a row at its first EOS (default true)"),
}
GAMMA = Option(int_or_auto, "draft tokens per round (ar-spec, default 4; auto: the γ with the most tokens/s on this "
                            "device, timed on the first prompt's first 64 tokens, reported as auto_gamma) or the "
                            "DFlash block γ (dflash / d2sd, default 16)")
DRAFTS = Option(int, "d2sd: drafts of the block the target's tree starts from, the first of its γ − 1 (default 0: "
                     "all)")
DRAFTER = Option(str, "the AR drafter (ar-spec) or DFlash block drafter (dflash / d2sd) checkpoint "
                      "(default: the bundled one)")


def _generate(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, **given: Any) -> Any:
    from ..speculative.armethods import ar_method_generate

    return ar_method_generate(model, tokenizer, prompts, cfg, **given)


# One decode function per set of model roles: `ar_method_generate` picks the loop by cfg.method, and
# each function takes exactly its roles' keywords, so a model the method does not load is an error.
def run_target(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
               streamer: Any = None, meter: Any = None) -> Any:
    return _generate(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer, meter=meter)


def run_drafted(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
                streamer: Any = None, meter: Any = None, drafter: Any = None, drafter_tokenizer: Any = None) -> Any:
    return _generate(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer, meter=meter,
                     drafter=drafter, drafter_tokenizer=drafter_tokenizer)


def run_two_drafters(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
                     streamer: Any = None, meter: Any = None, drafter: Any = None, drafter_tokenizer: Any = None,
                     vp_drafter: Any = None) -> Any:
    return _generate(model, tokenizer, prompts, cfg, progress=progress, streamer=streamer, meter=meter,
                     drafter=drafter, drafter_tokenizer=drafter_tokenizer, vp_drafter=vp_drafter)


RUNS: dict[tuple[str, ...], Callable[..., Any]] = {
    ("model",): run_target, ("model", "drafter"): run_drafted, ("model", "drafter", "vp_drafter"): run_two_drafters,
}


def ar_method(name: str, summary: str, options: dict[str, Option] | None = None, roles: tuple[str, ...] = ("model",),
              stats: Any = None, batches: bool = False) -> Method:
    """An AR-target method whose config is `ARMethodConfig(name, ...)` and whose decode function is
    its roles' one in RUNS."""
    def build(base: Any = None, **given: Any) -> Any:
        from ..speculative.armethods import build_ar_config

        return build_ar_config(name, base, **given)

    def load(cfg: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
        from ..speculative.armethods import load_drafters

        return load_drafters(cfg, model, tokenizer)

    return Method(name, "ar", summary, build=build,
                  config_type=(Ref("diffspec.speculative.armethods:ARMethodConfig"),),
                  run=RUNS[roles], options={**COMMON, **(options or {})}, roles=roles, takes_block_options=False,
                  stats=stats, batches=batches, load=load if roles != ("model",) else None)
