"""The method registry: what diffspec knows about each decoding method, in one place.

Every module of this package (but the `_private` ones) declares its methods in a
module-level `METHODS` tuple: each `Method` names its family (masked diffusion or
AR target), its config builder and config type, the options it owns beyond the
shared decoding fields (with text parsers and help), the model roles it loads, its
stats class, whether the server may batch its requests, and the decode function
that runs it. The registry finds the modules itself (`pkgutil`), so adding a
method is one file here; `api.generate`, the CLI's flags and help, the bench's
spec strings, `evaluate` and the server all read this table.

Code outside the package adds a method with `register(Method(...))`; the built-in
methods are always registered as well, whenever that happens.

The modules import nothing heavy at the top (`diffspec --help` must not import
torch): configs and stats classes are `Ref`s, and decode functions import what
they run inside their bodies.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

FAMILIES = {"diffusion": "masked-diffusion (LLaDA)", "ar": "autoregressive (Qwen3)"}
# The keyword arguments a decode function takes for each model role beyond the target ("model").
ROLE_KEYWORDS = {"drafter": ("drafter", "drafter_tokenizer"), "vp_drafter": ("vp_drafter",)}


@dataclass(frozen=True)
class Option:
    """A method's own option: how to parse it from text (CLI, bench specs) and what it means."""

    parse: Callable[[str], Any]
    help: str


@dataclass(frozen=True)
class Method:
    """One decoding method, declared once.

    `run(model, tokenizer, prompts, cfg, *, progress, streamer, meter, **models)` decodes a batch
    of prompts and returns a `GenerationResult`: `streamer` (`decoding.streamer`, or None) hears
    every token as it becomes final, `meter` (or None: a fresh one) is charged the forwards, and
    `models` are exactly the keywords of its roles (`ROLE_KEYWORDS`). Anything else is a
    TypeError, never silently dropped."""

    name: str
    family: str  # a key of FAMILIES: which checkpoints the method decodes
    summary: str  # one line, for `--method` help
    build: Callable[..., Any]  # build(base, **options) -> config; None options mean "not given"
    config_type: type | tuple[type, ...]  # configs `build` accepts as `base`
    run: Callable[..., Any]
    options: Mapping[str, Option] = field(default_factory=dict)  # beyond DecodeConfig / ARConfig shared fields
    roles: tuple[str, ...] = ("model",)  # model roles it loads: model (target / verifier), drafter, vp_drafter
    # Whether the shared block-decoder options (block_length, policy, cache, ...) apply: a task's
    # defaults for them are passed only to methods that take them.
    takes_block_options: bool = True
    stats: Any = None  # the class (or Ref) of its `GenerationResult.stats`, for merging parts of a run
    # Whether the server may decode requests with equal settings in one canvas: only where a row
    # decodes exactly as it would alone (see `serve.engine`).
    batches: bool = False
    # load(cfg, model, tokenizer) -> the keywords of `run` for the models its roles name beyond the
    # target, loaded from cfg's paths (or the bundled ones): a server loads them once and keeps them.
    load: Callable[..., dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        unknown = [r for r in self.roles if r != "model" and r not in ROLE_KEYWORDS]
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown role(s) {unknown}; roles are model, "
                             f"{', '.join(ROLE_KEYWORDS)}")

    @property
    def config_types(self) -> tuple[type, ...]:
        """The config classes `build` accepts as `base` (lazy references resolved)."""
        types = self.config_type if isinstance(self.config_type, tuple) else (self.config_type,)
        return tuple(_resolved(t) for t in types)

    @property
    def stats_class(self) -> type | None:
        return None if self.stats is None else _resolved(self.stats)

    @property
    def parsers(self) -> dict[str, Callable[[str], Any]]:
        return {k: o.parse for k, o in self.options.items()}

    @property
    def model_keywords(self) -> tuple[str, ...]:
        """The keywords `run` takes for the models of its roles (drafter, drafter_tokenizer, ...)."""
        return tuple(k for r in self.roles for k in ROLE_KEYWORDS.get(r, ()))


REGISTRY: dict[str, Method] = {}
_builtins_loaded = False
_lock = threading.Lock()


def register(method: Method) -> Method:
    """Add `method` to the registry (built-in modules are declared by their METHODS tuple)."""
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


def all_methods() -> tuple[Method, ...]:
    """Every registered method, built-ins first, in their declared order."""
    _load_builtin()
    return tuple(REGISTRY.values())


def method_names(family: str | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in all_methods() if family is None or m.family == family)


def option_owners() -> dict[str, list[str]]:
    """Each method-specific option and the methods that take it."""
    owners: dict[str, list[str]] = {}
    for m in all_methods():
        for k in m.options:
            owners.setdefault(k, []).append(m.name)
    return owners


def builtin_modules() -> list[Any]:
    """This package's method modules, in their declared `ORDER` (then by name)."""
    modules = [importlib.import_module(f"{__name__}.{info.name}")
               for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    return sorted(modules, key=lambda mod: (getattr(mod, "ORDER", 100), mod.__name__))


def _load_builtin() -> None:
    """Register the built-in methods on first use, ahead of any registered before it (their
    modules' decode functions import torch only when they run)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        builtins: dict[str, Method] = {}
        for module in builtin_modules():
            for method in getattr(module, "METHODS", ()):
                if method.name in builtins:
                    raise ValueError(f"method {method.name!r} is declared twice ({module.__name__})")
                builtins[method.name] = method
        clash = sorted(set(builtins) & set(REGISTRY))
        if clash:
            raise ValueError(f"method(s) {clash} registered twice: the names of built-in methods")
        merged = {**builtins, **REGISTRY}
        REGISTRY.clear()
        REGISTRY.update(merged)
        _builtins_loaded = True


def _resolved(obj: Any) -> Any:
    return obj.resolve() if isinstance(obj, Ref) else obj


class Ref:
    """A function or class named by 'module:attribute', imported on first use, so the registry
    (and `diffspec --help`) can describe every method without importing torch."""

    def __init__(self, path: str):
        self.path = path
        self._obj: Any = None

    def resolve(self) -> Any:
        if self._obj is None:
            module, _, attr = self.path.partition(":")
            self._obj = getattr(importlib.import_module(module), attr)
        return self._obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Ref({self.path!r})"
