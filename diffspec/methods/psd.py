"""psd: nested drafts from one forward's ranking, verified together in one batched forward
(`speculative.psd`)."""
from __future__ import annotations

from typing import Any, Sequence

from ..options import parse_bool, parse_depths
from . import Method, Option, Ref

ORDER = 30
OPTIONS = {
    "depths": Option(parse_depths, "nested draft depths, increasing, below block-length (default 1,3,5,7)"),
    "lossless": Option(parse_bool, "exactly the output of one-token greedy decoding, with fewer forwards"),
    "accept_threshold": Option(float, "beyond the paper: a drafted cell must also have the verifier's "
                                      "probability >= this for its token (default 0: argmax agreement)"),
    "draft_order": Option(str, "beyond the paper: confidence (PSD's, default) | position (nested drafts "
                               "left to right, each checked with every cell to its left filled)"),
}


def run_psd(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: Any, *, progress: bool = False,
            streamer: Any = None, meter: Any = None) -> Any:
    from ..speculative.psd import psd_generate

    return psd_generate(model, tokenizer, list(prompts), cfg, progress=progress, streamer=streamer, meter=meter)


METHODS = (Method(
    "psd", "diffusion",
    "PSD: nested drafts from one forward's ranking, verified together in one batched forward",
    build=Ref("diffspec.speculative.psd:build_psd_config"),
    config_type=(Ref("diffspec.decoding.config:DecodeConfig"), Ref("diffspec.speculative.psd:PSDConfig")),
    run=run_psd, options=OPTIONS, stats=Ref("diffspec.speculative.psd:PSDStats"), batches=True),)
