"""The method registry: what diffspec knows about each decoding method, in one place.

A `Method` names its family (masked diffusion or AR target), its config
builder and config type, the options it owns beyond the shared decoding
fields (with text parsers and help), the model roles it loads and the batch
decode function that runs it. `api.generate`, the CLI's flags and help, the
bench's spec strings and `evaluate` all read this table, so adding a method
is one module plus one `register(Method(...))` call here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

FAMILIES = {"diffusion": "masked-diffusion (LLaDA)", "ar": "autoregressive (Qwen3)"}


@dataclass(frozen=True)
class Option:
    """A method's own option: how to parse it from text (CLI, bench specs) and what it means."""

    parse: Callable[[str], Any]
    help: str


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # a key of FAMILIES: which checkpoints the method decodes
    summary: str  # one line, for `--method` help
    build: Callable[..., Any]  # build(base, **options) -> config; None options mean "not given"
    config_type: type | tuple[type, ...]  # configs `build` accepts as `base`
    run: Callable[..., Any]  # run(model, tokenizer, prompts, cfg, **models_and_flags) -> GenerationResult
    options: Mapping[str, Option] = field(default_factory=dict)  # beyond DecodeConfig / ARConfig shared fields
    roles: tuple[str, ...] = ("model",)  # model roles it loads: model (target / verifier), drafter, vp_drafter
    # Whether the shared block-decoder options (block_length, policy, cache, ...) apply: a task's
    # defaults for them are passed only to methods that take them.
    takes_block_options: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")

    @property
    def config_types(self) -> tuple[type, ...]:
        """The config classes `build` accepts as `base` (lazy references resolved)."""
        types = self.config_type if isinstance(self.config_type, tuple) else (self.config_type,)
        return tuple(t.resolve() if isinstance(t, Ref) else t for t in types)

    @property
    def parsers(self) -> dict[str, Callable[[str], Any]]:
        return {k: o.parse for k, o in self.options.items()}


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: Any) -> Method:
    """The registered method called `name`, or a ValueError listing the choices."""
    _load_builtin()
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_names(family: str | None = None) -> tuple[str, ...]:
    _load_builtin()
    return tuple(n for n, m in REGISTRY.items() if family is None or m.family == family)


def option_owners() -> dict[str, list[str]]:
    """Each method-specific option and the methods that take it."""
    _load_builtin()
    owners: dict[str, list[str]] = {}
    for m in REGISTRY.values():
        for k in m.options:
            owners.setdefault(k, []).append(m.name)
    return owners


def _load_builtin() -> None:
    """Register the built-in methods on first use (their modules import torch; `diffspec --help`
    must not pay for that)."""
    if not REGISTRY:
        from . import builtin_methods  # noqa: F401  (registers on import)


class Ref:
    """A function or class named by 'module:attribute', imported on first use, so the registry
    (and `diffspec --help`) can describe every method without importing torch."""

    def __init__(self, path: str):
        self.path = path
        self._obj: Any = None

    def resolve(self) -> Any:
        if self._obj is None:
            import importlib

            module, _, attr = self.path.partition(":")
            self._obj = getattr(importlib.import_module(module), attr)
        return self._obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Ref({self.path!r})"
