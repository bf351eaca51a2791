"""What the AR-target methods (ar, ar-spec, dflash, d2sd) share: one config (`ARMethodConfig`,
`speculative.armethods`), two options and one way of declaring a method."""
from __future__ import annotations

from typing import Any, Callable

from ..options import parse_bool
from . import Method, Option, Ref

COMMON = {
    "max_new_tokens": Option(int, "another name for gen_length on AR targets"),
    "stop_at_eos": Option(parse_bool, "stop a row at its first EOS (default true)"),
}
GAMMA = Option(int, "draft tokens per round (ar-spec, default 4) or the DFlash block γ (dflash / d2sd, default 16)")
DRAFTER = Option(str, "the AR drafter (ar-spec) or DFlash block drafter (dflash / d2sd) checkpoint "
                      "(default: the bundled one)")


def ar_method(name: str, summary: str, run: Callable[..., Any], options: dict[str, Option] | None = None,
              roles: tuple[str, ...] = ("model",), stats: Any = None, batches: bool = False) -> Method:
    """An AR-target method whose config is `ARMethodConfig(name, ...)`."""
    def build(base: Any = None, **given: Any) -> Any:
        from ..speculative.armethods import build_ar_config

        return build_ar_config(name, base, **given)

    def load(cfg: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
        from ..speculative.armethods import load_drafters

        return load_drafters(cfg, model, tokenizer)

    return Method(name, "ar", summary, build=build,
                  config_type=(Ref("diffspec.speculative.armethods:ARMethodConfig"),),
                  run=run, options={**COMMON, **(options or {})}, roles=roles, takes_block_options=False,
                  stats=stats, batches=batches, load=load if roles != ("model",) else None)
