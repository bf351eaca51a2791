"""One cost meter for every decoder, so methods are compared on the same axes.

`nfe` counts model calls (a batched call counts once and its batch size is
recorded); `sequence_forwards` counts how many sequences each call advanced,
which is what tokens-per-forward divides by, so batching prompts together does
not change a method's TPF. A batched call that scores K views of the same
prompt (PSD, DualDiffusion's stepwise view) advances that prompt once; its K
rows show up in `tokens_processed` and FLOPs. FLOPs come from the model's own
estimate (2·params·tokens + attention), so a cheap drafter step and an
expensive verifier step are comparable.

`tokens_generated` means the same for every method: each answer's tokens up to
and including its first EOS (`answer_length`). A masked diffusion model fills
the whole canvas, the EOS padding after the answer included, but counting that
padding would inflate its tokens per forward against an AR method that stops
at EOS. Two TPFs are reported: per forward of the primary model (target /
verifier: `tokens_per_forward`) and per forward of any model, drafters
included (`tokens_per_forward_all`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator

import torch

if TYPE_CHECKING:
    from ..models.layers import KVCacheHook


def answer_length(ids: list[int], eos_ids: Collection[int]) -> int:
    """Tokens of one answer up to and including its first EOS (all of them when there is none)."""
    return next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))



def sync_device(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a wall-clock reading around
    it measures the work; nothing to wait for on the CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)

@dataclass
class ModelCost:
    """One model's totals, and the shapes of its forwards: `shapes` counts forwards by "B,Q,K"
    (batch, query tokens, keys attended), from which a latency model for another device or model
    size (`bench.latency`) is computed after the fact, since a forward's time is not linear in its
    FLOPs. `params` is the model's size (its FLOP estimate's), which such a model scales by."""

    nfe: int = 0
    sequence_forwards: int = 0
    tokens_processed: int = 0
    flops: float = 0.0
    max_batch: int = 0
    params: int = 0
    shapes: dict[str, int] = field(default_factory=dict)

    def add(self, other: "ModelCost") -> None:
        self.nfe += other.nfe
        self.sequence_forwards += other.sequence_forwards
        self.tokens_processed += other.tokens_processed
        self.flops += other.flops
        self.max_batch = max(self.max_batch, other.max_batch)
        self.params = self.params or other.params
        for k, n in other.shapes.items():
            self.shapes[k] = self.shapes.get(k, 0) + n


@dataclass
class CostMeter:
    """Accumulates cost per named model. `primary` is the model whose forwards
    define tokens-per-forward (the verifier / target in speculative methods)."""

    primary: str = "model"
    models: dict[str, ModelCost] = field(default_factory=dict)
    tokens_generated: int = 0
    sequences: int = 0
    wall_seconds: float = 0.0
    # Called after every recorded forward (a progress bar's heartbeat); not part of the totals.
    on_record: Callable[["CostMeter"], None] | None = field(default=None, repr=False, compare=False)

    def record(self, name: str, batch: int, n_query: int, n_keys: int, flops: float, sequences: int | None = None,
               params: int = 0) -> None:
        c = self.models.setdefault(name, ModelCost())
        c.nfe += 1
        c.sequence_forwards += batch if sequences is None else sequences
        c.tokens_processed += batch * n_query
        c.flops += flops
        c.max_batch = max(c.max_batch, batch)
        c.params = c.params or params
        key = f"{batch},{n_query},{n_keys}"
        c.shapes[key] = c.shapes.get(key, 0) + 1
        if self.on_record is not None:
            self.on_record(self)

    @contextmanager
    def timed(self, device: torch.device | None = None) -> Iterator[None]:
        sync_device(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync_device(device)
            self.wall_seconds += time.perf_counter() - t0

    @classmethod
    def from_summary(cls, d: dict[str, Any]) -> "CostMeter":
        """The meter `summary()` described (its totals; a saved part of a run is merged through this)."""
        return cls(primary=d["primary"], models={k: ModelCost(**{"shapes": {}, **v}) for k, v in d["models"].items()},
                   tokens_generated=d["tokens_generated"], sequences=d["sequences"], wall_seconds=d["wall_seconds"])

    def merge(self, other: "CostMeter") -> None:
        for name, c in other.models.items():
            self.models.setdefault(name, ModelCost()).add(c)
        self.tokens_generated += other.tokens_generated
        self.sequences += other.sequences
        self.wall_seconds += other.wall_seconds

    @property
    def nfe(self) -> int:
        return sum(c.nfe for c in self.models.values())

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.models.values())

    @property
    def tokens_processed(self) -> int:
        return sum(c.tokens_processed for c in self.models.values())

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward of the primary model, per sequence."""
        c = self.models.get(self.primary)
        if c and c.sequence_forwards:
            return self.tokens_generated / c.sequence_forwards
        return self.tokens_per_forward_all  # e.g. a speculative run whose verifier never ran

    @property
    def tokens_per_forward_all(self) -> float:
        n = sum(c.sequence_forwards for c in self.models.values())
        return self.tokens_generated / n if n else 0.0

    def summary(self) -> dict[str, Any]:
        """Totals as JSON-ready numbers. `tokens_per_forward` is per primary-model (target /
        verifier) forward, `tokens_per_forward_all` per forward of any model."""
        per_seq = max(self.sequences, 1)
        return {
            "nfe": self.nfe,
            "nfe_per_sequence": sum(c.sequence_forwards for c in self.models.values()) / per_seq,
            "tokens_processed": self.tokens_processed,
            "flops": self.flops,
            "tokens_generated": self.tokens_generated,
            "tokens_per_forward": self.tokens_per_forward,
            "tokens_per_forward_all": self.tokens_per_forward_all,
            "wall_seconds": self.wall_seconds,
            "sequences": self.sequences,
            "primary": self.primary,
            "models": {k: asdict(v) for k, v in self.models.items()},
        }


@contextmanager
def progress_bar(meter: CostMeter, total: int, desc: str, enabled: bool, every: float = 0.5) -> Iterator[Any]:
    """A tqdm bar over prompts that also moves with every forward: it shows the forwards run and
    redraws at least every `every` seconds, so a long batch never looks stalled."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)
    last = [0.0]

    def beat(m: CostMeter) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            bar.set_postfix_str(f"forwards {m.nfe}", refresh=True)

    previous, meter.on_record = meter.on_record, (beat if enabled else meter.on_record)
    try:
        yield bar
    finally:
        meter.on_record = previous
        bar.close()


class MeteredModel:
    """Calls a model and charges the meter: one wrapper, so no method can forget.

    A call with a `kv_cache` (any `models.layers.KVCacheHook`: the diffusion
    caches, PSD's shared K/V, `CausalKVCache`) is charged for the cache's
    `last_n_keys`, the keys that forward attended to; a call without one for
    its own Q tokens.
    """

    def __init__(self, model: torch.nn.Module, meter: CostMeter, name: str = "model"):
        self.model, self.meter, self.name = model, meter, name
        self.config = model.config

    def __call__(self, input_ids: torch.Tensor, *, sequences: int | None = None, **kw: Any):
        out = self.model(input_ids, **kw)
        B, Q = input_ids.shape
        cache: KVCacheHook | None = kw.get("kv_cache")
        n_keys = cache.last_n_keys if cache is not None else Q
        self.meter.record(self.name, B, Q, n_keys, B * self._flops(Q, n_keys), sequences, params=self._params())
        return out

    def _flops(self, n_query: int, n_keys: int) -> float:
        """model.forward_flops(n_query, n_keys) without calling it every forward: it walks every parameter
        (about 1 ms for SmolLM2's 273 tensors, 3 % of a one-token CPU forward). Every cost model
        here is a·Q + b·Q·K (weights, then attention); that is read off two calls and checked on two
        more, once per wrapper (one run), and a model whose cost is not of that form is called as is."""
        coef = self.__dict__.get("_flops_coef")
        if coef is None:
            f = self.model.forward_flops
            a = f(1, 0)
            b = f(1, 1) - a
            fits = all(f(q, k) == q * a + q * k * b for q, k in ((2, 3), (7, 40)))
            coef = self._flops_coef = (a, b) if fits else ()
        if not coef:
            return self.model.forward_flops(n_query, n_keys)
        a, b = coef
        return n_query * a + n_query * n_keys * b

    def _params(self) -> int:
        n = getattr(self, "_n_params", None)
        if n is None:
            count = getattr(self.model, "num_params", None)
            n = self._n_params = int(count()) if callable(count) else 0
        return n


def meter_primary(model: torch.nn.Module, meter: CostMeter | None = None) -> tuple[CostMeter, MeteredModel]:
    """The run's meter (the caller's, or a fresh one) and `model` charged to it as its primary model:
    how every single-model decode loop starts, so its cost lands where the run's reports read it."""
    meter = meter or CostMeter()
    return meter, MeteredModel(model, meter, meter.primary)
