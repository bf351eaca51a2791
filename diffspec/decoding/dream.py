"""Dream's own sampler (`diffusion_generate` / `_sample` of Dream-org's `generation_utils.py`).

Whole-sequence decoding: the prompt is followed by `max_new_tokens` mask tokens
and every step runs one full bidirectional forward over the whole canvas (no
blocks). The timestep schedule is `t = linspace(1, eps, steps + 1)`; at step i
(t = t_i, s = t_{i+1}):

- `origin` (Dream's default): every masked cell is revealed independently with
  probability 1 - s/t (1 at the last step), its token sampled from the model;
- `maskgit_plus` / `topk_margin` / `entropy`: every masked cell gets a candidate
  token and a confidence (top-1 probability, top-1 minus top-2 probability, or
  negative entropy of the distribution), and `int(m · (1 - s/t))` cells are
  committed (all remaining ones at the last step), m = masked cells per row
  averaged over the batch (equal in every row here). With `alg_temp` > 0 the
  cells are drawn without replacement from softmax(confidence / alg_temp)
  instead of taken by rank.

Candidate tokens: greedy (argmax) at `temperature` 0, otherwise a draw from
softmax(logits / temperature) after top-p (smallest set whose mass reaches p,
the first token always kept) and top-k filtering, in that order, as Dream does.
Logits come from the model already aligned (`logits[:, i]` predicts token i;
`DreamModel` applies Dream's shift itself), so the same loop runs a LLaDA model.

Left-padded batches: Dream's positions (the first real token is position 0,
padding gets position 1) and padding hidden from attention.

What is ours, not Dream's:
- all randomness comes from one `torch.Generator` seeded from `seed` (the
  reference draws from torch's global RNG), so a run is reproducible;
- probabilities, confidences and sampling are computed in float32 whatever the
  model dtype (the reference uses the logits' dtype, bf16 on GPU);
- the mask token is never proposed (the reference can commit it, leaving the
  cell masked in the output);
- equal confidences go to the leftmost cell (`torch.topk` leaves that order
  unspecified);
- the loop stops once no cell is masked (with `origin` the canvas can fill up
  before the last step; the reference keeps running forwards that change nothing).
- `transfer_schedule="even"` (opt-in; the default "dream" is Dream's): the
  confidence algs commit the masked cells evenly over the steps (the remainder in
  the first steps, as LLaDA's loop does) instead of `int(m · (1 - s/t))`. Dream's
  floor commits nothing at the first step and, at steps = tokens, two cells at
  the last; on the bundled dream-arith model that one joint step costs half the
  accuracy (benchmarks/dream-schedule-cpu).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.tokenizer import Tokenizer
from .capabilities import capabilities
from .config import is_finite_number
from .diffusion import run_batches
from .runner import GenerationResult
from .meter import CostMeter, MeteredModel, meter_primary
from .policies import select_topk
from .state import Canvas
from .streamer import CanvasReporter, Streamer

__all__ = ["ALGS", "DreamDecodeConfig", "dream_generate", "dream_decode_canvas", "sample_tokens",
           "dream_positions"]

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
TRANSFER_SCHEDULES = ("dream", "even")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DreamDecodeConfig:
    """Options of Dream's `diffusion_generate`, validated up front.

    alg, alg_temp, temperature, top_p, top_k and eps default to Dream's
    `DreamGenerationConfig` defaults; `max_new_tokens` and `steps` (Dream: 20-token
    `max_length`, 512 steps) are ours: one token per step over 128 tokens.
    """

    max_new_tokens: int = 128
    steps: int = 128
    alg: str = "origin"
    alg_temp: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    seed: int = 0
    batch_size: int = 32
    transfer_schedule: str = "dream"  # beyond Dream: "even" commits the masked cells evenly over the steps

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "steps", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.alg, str) or self.alg not in ALGS:
            raise ValueError(f"alg must be one of {', '.join(ALGS)}; got {self.alg!r}")
        if not is_finite_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and (not is_finite_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.alg_temp is not None:
            if not is_finite_number(self.alg_temp) or self.alg_temp < 0:
                raise ValueError(f"alg_temp must be a finite number >= 0 or None, got {self.alg_temp!r}")
            if self.alg == "origin" and self.alg_temp > 0:
                raise ValueError("alg_temp only applies to the confidence-based algs (maskgit_plus, topk_margin, "
                                 "entropy); alg 'origin' reveals cells at random already")
        if not is_finite_number(self.eps) or not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")
        if self.transfer_schedule not in TRANSFER_SCHEDULES:
            raise ValueError(f"transfer_schedule must be one of {', '.join(TRANSFER_SCHEDULES)}; "
                             f"got {self.transfer_schedule!r}")
        if self.transfer_schedule == "even" and self.alg == "origin":
            raise ValueError("transfer_schedule 'even' applies to the confidence-based algs (maskgit_plus, "
                             "topk_margin, entropy); alg 'origin' reveals each masked cell with probability "
                             "1 - s/t, about 1/(steps left), which is even already")

    def unused_options(self, given: set[str] | list[str]) -> list[str]:
        """Options in `given` this config would ignore, so a CLI can refuse them: `alg_temp` with
        alg 'origin' (random order already), `top_p` / `top_k` with alg 'origin' at temperature 0
        (greedy tokens; the confidence-based algs read the filtered distribution even then)."""
        greedy_origin = self.alg == "origin" and self.temperature == 0
        used_by = {"alg_temp": self.alg != "origin", "top_p": not greedy_origin, "top_k": not greedy_origin}
        return sorted(k for k in given if used_by.get(k) is False)

    @property
    def gen_length(self) -> int:
        """Generation slots of the canvas (the name the shared batching code reads)."""
        return self.max_new_tokens

    def replace(self, **kw: Any) -> "DreamDecodeConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "dream", **asdict(self)}


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (the first always)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    mask = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
) -> tuple[Tensor, Tensor]:
    """(confidence, token) per row of `logits` (M, V), as Dream's `sample_tokens`, in float32.

    The confidence is the chosen token's probability, or top-1 minus top-2 probability
    (`margin_confidence`), or the negative entropy (`neg_entropy`), all under the
    temperature- and top-p/top-k-adjusted distribution.
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_filter(logits, top_p)
    if top_k is not None:
        logits = _top_k_filter(logits, top_k)
    probs = F.softmax(logits, dim=-1)
    if temperature > 0 and probs.shape[0] > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        confidence = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        confidence = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0)
    if neg_entropy:
        confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return confidence, x0


def dream_positions(attention_mask: Tensor) -> Tensor | None:
    """Dream's RoPE positions for a left-padded canvas: the first real token is 0, padding is 1;
    None when nothing is padded (positions 0..N-1)."""
    if bool(attention_mask.all()):
        return None
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(~attention_mask.bool(), 1)


def dream_decode_canvas(model: MeteredModel, canvas: Canvas, cfg: DreamDecodeConfig,
                        generator: torch.Generator | None, streamer: Streamer | None = None) -> None:
    """Fill every masked cell of `canvas` in place with Dream's whole-sequence loop (which never
    re-masks a cell, so `streamer` hears each step's commits before the next forward)."""
    report = CanvasReporter(streamer, canvas) if streamer is not None else None
    x, mask_id = canvas.x, canvas.mask_id
    B = x.shape[0]
    positions = dream_positions(canvas.attention_mask)
    key_mask = None if positions is None else canvas.attention_mask
    timesteps = torch.linspace(1, cfg.eps, cfg.steps + 1, device=x.device)
    even: list[int] | None = None
    for i in range(cfg.steps):
        if report is not None and report.tick():
            return
        mask_index = x == mask_id
        working = int(mask_index.any(1).sum())
        if working == 0:
            break
        logits = model(x, positions=positions, attention_mask=key_mask, sequences=working).logits
        mask_logits = logits[mask_index].float()
        mask_logits[:, mask_id] = -torch.inf  # never propose the mask token itself
        t, s = timesteps[i], timesteps[i + 1]
        last = i == cfg.steps - 1
        if cfg.alg == "origin":
            p_transfer = 1 - s / t if not last else 1
            x0 = torch.full((mask_logits.shape[0],), mask_id, dtype=x.dtype, device=x.device)
            reveal = torch.rand(x0.shape, generator=generator, device=x.device) < p_transfer
            if bool(reveal.any()):
                _, x0[reveal] = sample_tokens(mask_logits[reveal], cfg.temperature, cfg.top_p, cfg.top_k, generator)
            x[mask_index] = x0
            continue
        confidence, x0 = sample_tokens(mask_logits, cfg.temperature, cfg.top_p, cfg.top_k, generator,
                                       margin_confidence=cfg.alg == "topk_margin",
                                       neg_entropy=cfg.alg == "entropy")
        num_mask = mask_index.sum() / B  # float32 tensor, as in the reference
        if cfg.transfer_schedule == "even":
            if even is None:  # split the canvas's masked cells over the steps, the remainder first (as LLaDA)
                m0 = int(num_mask)
                even = [m0 // cfg.steps + (1 if j < m0 % cfg.steps else 0) for j in range(cfg.steps)]
            k = even[i] if not last else int(num_mask)
        else:
            k = int(num_mask * (1 - s / t)) if not last else int(num_mask)
        if k <= 0:
            continue
        full_conf = torch.full(x.shape, -torch.inf, dtype=torch.float32, device=x.device)
        full_conf[mask_index] = confidence
        if cfg.alg_temp is None or cfg.alg_temp == 0:
            chosen = select_topk(full_conf, k)
        else:
            probs = F.softmax(full_conf / cfg.alg_temp, dim=-1)
            idx = torch.multinomial(probs, k, replacement=False, generator=generator)
            chosen = torch.zeros_like(mask_index).scatter_(1, idx, True) & mask_index
        proposal = torch.full_like(x, mask_id)
        proposal[mask_index] = x0
        x[chosen] = proposal[chosen]
    if report is not None:
        report()


@torch.inference_mode()
def dream_generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: DreamDecodeConfig,
    progress: bool = False,
    meter: CostMeter | None = None,
    streamer: Streamer | None = None,
) -> GenerationResult:
    """Decode `prompts` with Dream's sampler in batches of `cfg.batch_size`.

    Works on any masked diffusion model whose forward returns aligned logits (Dream,
    LLaDA); an autoregressive model is refused. Token ids are cut at the first EOS.
    """
    if capabilities(model).mask_id is None:
        raise ValueError(f"the dream sampler needs a masked diffusion model (Dream or LLaDA) with a mask token; "
                         f"{type(model).__name__} has none (an autoregressive model? use the AR methods)")
    meter, metered = meter_primary(model, meter)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    token_ids, texts, raw = run_batches(
        model, tokenizer, prompts, cfg, meter,
        lambda canvas, stream: dream_decode_canvas(metered, canvas, cfg, generator, stream),
        desc=f"dream[{cfg.alg}]", progress=progress, streamer=streamer)
    return GenerationResult(token_ids, texts, meter, cfg, raw)
