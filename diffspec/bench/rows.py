"""Finished bench rows kept on disk, so a long run can stop and `--resume` where it left off.

A row on a real model can take an hour on a CPU (issue #19's SmolLM2 suite is several CPU-hours),
longer than a working session. Each finished row is written to OUT/rows/<key>.json, with its
generated ids so the lossless check against the baseline still works on a resumed run. The key
hashes everything that decides what the row decodes: the spec, the task, the full decoding config,
every example's prompt and gold answer, the model's weights and the weights of any drafter the row
loads. A row is reused only when all of these match; anything else is decoded again, so a resumed
table never mixes in a row measured on other data, another model or other options.

Wall clock is the one thing a reused row does not share with the rest of the run: it was measured
at another time, possibly under another load. Each row records when it was measured
(`measured_at`) and the run lists the reused rows (`resumed_rows`), so a reader can tell.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..jsonio import OutputError, OutputFile, parse_json_file
from ..models.checkpoint import weights_fingerprint  # noqa: F401 (the row keys' model hash)
from ..tasks import Example

ROWS_DIR = "rows"


def _dir_fingerprint(path: str | Path) -> str:
    """Every file of a drafter checkpoint, hashed whole (drafters are a few MB)."""
    p = Path(path)
    if not p.exists():
        return f"missing:{p}"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() if f != p else f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def drafter_paths(cfg: Any, model: torch.nn.Module) -> list[str]:
    """The checkpoint directories a row loads besides the model: an AR method's drafters (its own or
    the bundled ones for this target) or a DualDiffusion drafter given by path."""
    from ..speculative.armethods import ARMethodConfig, bundled_drafter

    if isinstance(cfg, ARMethodConfig):
        if cfg.method == "ar":
            return []
        paths = [cfg.drafter or str(bundled_drafter(cfg.method, model))]
        if cfg.method == "d2sd":
            paths.append(cfg.vp_drafter or str(bundled_drafter("vp", model)))
        return paths
    drafter = getattr(cfg, "drafter", None)
    return [drafter] if isinstance(drafter, str) and drafter != "self" else []


def examples_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.gold], default=str).encode())
    return h.hexdigest()


WITHOUT_EXAMPLES = "per chunk"  # a chunked row's key leaves its examples out; each chunk adds its own


def row_key(spec: str, task: str, cfg: Any, examples_hash: str, model_hash: str, model: torch.nn.Module) -> str:
    """The name a finished row is saved under: equal keys decode the same ids with the same cost.
    `examples_hash` is WITHOUT_EXAMPLES for the base key of a chunked row (see `chunk_key`)."""
    parts = {"spec": spec, "task": task, "config": cfg.to_dict(), "examples": examples_hash, "model": model_hash,
             "drafters": [_dir_fingerprint(p) for p in drafter_paths(cfg, model)]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_row(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The saved row for `key`, or None. A file that is not valid JSON or lacks the row is an error
    naming it: silently decoding again would hide a broken directory."""
    path = out_dir / ROWS_DIR / f"{key}.json"
    if not path.is_file():
        return None
    saved = parse_json_file(path, "saved bench row")
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("row"), dict) \
            or "token_ids" not in saved["row"]:
        raise ValueError(f"saved bench row {path} is not a row this version of diffspec wrote; delete it "
                         "(or the whole --out directory) and run again")
    return saved["row"]


def save_row(out_dir: Path, key: str, spec: str, row: dict[str, Any]) -> Path | None:
    """Keep a finished row for --resume. A row that cannot be saved is a warning, not an error: the
    run still has it in memory and writes the whole result at the end."""
    path = out_dir / ROWS_DIR / f"{key}.json"
    text = json.dumps({"key": key, "spec": spec, "row": row}, separators=(",", ":")) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # the same key measured again (a run without --resume)
        return OutputFile.check(path, "saved bench row").write_text(text)
    except (OSError, OutputError) as e:
        print(f"diffspec: warning: could not save the finished row to {path} ({e}); "
              "--resume will decode it again", file=sys.stderr)
        return None


# ---- chunks: a row too long for one sitting is decoded and saved a few batches at a time

def chunk_key(row_key: str, examples: Sequence[Example]) -> str:
    """A chunk's name: its row's key (without the row's examples) and the chunk's own examples."""
    return hashlib.sha256(f"{row_key}|{examples_fingerprint(examples)}".encode()).hexdigest()[:24]


def _part_path(out_dir: Path, key: str, start: int, end: int) -> Path:
    return out_dir / ROWS_DIR / f"{key}.part-{start:05d}-{end:05d}.json"


def save_part(out_dir: Path, key: str, start: int, end: int, part: dict[str, Any]) -> None:
    """Keep one decoded chunk of a row (examples start..end-1): what `evaluate._merge` needs."""
    saved = {"key": key, "start": start, "end": end, "indices": part["indices"], "scores": part["scores"],
             "texts": part["texts"], "ids": part["ids"], "meter": part["meter"].summary(), "stats": part["stats"],
             "measured_at": part.get("measured_at")}
    path = _part_path(out_dir, key, start, end)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        OutputFile.check(path, "saved bench chunk").write_text(json.dumps(saved, separators=(",", ":")) + "\n")
    except (OSError, OutputError) as e:
        print(f"diffspec: warning: could not save the finished chunk to {path} ({e}); "
              "--resume will decode it again", file=sys.stderr)


def load_part(out_dir: Path, key: str, start: int, end: int) -> dict[str, Any] | None:
    from ..decoding.meter import CostMeter

    path = _part_path(out_dir, key, start, end)
    if not path.is_file():
        return None
    saved = parse_json_file(path, "saved bench chunk")
    need = ("indices", "scores", "texts", "ids", "meter", "stats")
    if not isinstance(saved, dict) or saved.get("key") != key or any(k not in saved for k in need) \
            or saved["indices"] != list(range(start, end)):
        raise ValueError(f"saved bench chunk {path} is not a chunk this version of diffspec wrote; delete it "
                         "(or the whole --out directory) and run again")
    return {**{k: saved[k] for k in need}, "meter": CostMeter.from_summary(saved["meter"]), "config": None,
            "measured_at": saved.get("measured_at"), "reused": True}
