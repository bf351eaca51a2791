"""dualdiffusion: a cheap drafter runs N steps, the full verifier checks them, a rule decides
(`speculative.dualdiffusion`)."""
from __future__ import annotations

from typing import Any, Sequence

from ..options import parse_bool
from . import Method, Option, Ref

ORDER = 20
OPTIONS = {
    "drafter": Option(str, "drafter checkpoint directory, or 'self' = the verifier's model (default self)"),
    "drafter_cache": Option(str, "drafter's cache (default dual)"),
    "drafter_policy": Option(str, "drafter's unmasking policy (default threshold)"),
    "drafter_threshold": Option(float, "drafter's threshold-policy confidence (default 0.9)"),
    "rule": Option(str, "exact_match (default) | confidence_threshold | disagreement_with_confidence | "
                        "trust_verifier | no_verification (the reference's rules) | kl_divergence | "
                        "disagreement_and_confidence | verifier_overwrite | unmask_confidence (ours)"),
    "rule_threshold": Option(float, "τ of the rule: probability in (0, 1], KL in nats > 0 (default: the rule's)"),
    "num_drafter_steps": Option(int, "drafter steps per iteration (default 4)"),
    "num_verifier_steps": Option(int, "verifier forwards per iteration (default 1)"),
    "max_iterations": Option(int, "draft/verify iterations before the verifier fills the rest (default gen-length)"),
    "verifier_view": Option(str, "masked (default) | stepwise | drafted (the paper's) | leftward (beyond the "
                                 "paper: each draft scored with the drafts left of it filled): what the verifier "
                                 "sees of the drafts"),
    "verifier_unmask": Option(int, "masked cells the verifier decodes itself per forward (default 1 for the "
                                   "reference's rules, 0 for ours)"),
    "rollback": Option(str, "discard (default): re-mask what the iteration filled after a row's first rejected "
                            "cell, as speculative decoding does | keep: leave it"),
    "progress_guard": Option(parse_bool, "fill a stalled row's first re-masked cell with the verifier's token "
                                         "(default true)"),
    "adaptive_drafter_steps": Option(parse_bool, "double the drafter steps after a fully accepted iteration, "
                                                 "halve them after a rejection (default false)"),
}


def resolve_drafter(drafter: Any, cfg: Any, verifier: Any, drafter_tokenizer: Any = None) -> tuple[Any, Any]:
    """The drafter model and its tokenizer: an object as given, `cfg.drafter` loaded onto the
    verifier's device and dtype, or (None, None) for 'self' (the verifier drafts)."""
    import torch

    from ..models.checkpoint import load_model
    from ..speculative.dualdiffusion import SELF

    if isinstance(drafter, torch.nn.Module):
        return drafter, drafter_tokenizer
    if drafter is not None:
        raise ValueError(f"drafter must be a checkpoint path, 'self', a model object or None; "
                         f"got {type(drafter).__name__}")
    if cfg.drafter == SELF:
        return None, None
    param = next(verifier.parameters())
    return load_model(cfg.drafter, device=param.device, dtype=param.dtype)


def load_dual(cfg: Any, model: Any, tokenizer: Any) -> dict[str, Any]:
    """The drafter `cfg` names, loaded (nothing for 'self': the verifier drafts)."""
    d_model, d_tok = resolve_drafter(None, cfg, model)
    return {} if d_model is None else {"drafter": d_model, "drafter_tokenizer": d_tok}


def run_dual(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
             streamer: Any = None, meter: Any = None, drafter: Any = None, drafter_tokenizer: Any = None) -> Any:
    import torch

    from ..speculative.dualdiffusion import dualdiffusion_generate

    if isinstance(drafter, torch.nn.Module):
        cfg = cfg.replace(drafter=f"<{type(drafter).__name__} object>")
    d_model, d_tok = resolve_drafter(drafter, cfg, model, drafter_tokenizer)
    return dualdiffusion_generate(model, tokenizer, list(prompts), cfg, d_model, d_tok, progress=progress,
                                  streamer=streamer, meter=meter)


METHODS = (Method(
    "dualdiffusion", "diffusion",
    "DualDiffusion: a cheap drafter runs N steps, the full verifier checks them, a rule decides",
    build=Ref("diffspec.speculative.dualdiffusion:build_dual_config"),
    config_type=(Ref("diffspec.decoding.config:DecodeConfig"), Ref("diffspec.speculative.dualdiffusion:DualConfig")),
    run=run_dual, options=OPTIONS, roles=("model", "drafter"), load=load_dual,
    stats=Ref("diffspec.speculative.dualdiffusion:SpecStats")),)
