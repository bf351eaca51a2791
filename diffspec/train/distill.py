"""The target's own greedy continuations, with its hidden states, cached on disk in chunks.

Drafters learn to predict what the target will say, so their data are the
target's greedy answers to training prompts (not the dataset's references).
On a CPU generating them is the expensive part (SmolLM2-135M: about an hour
for 2,000 GSM8K answers of up to 256 tokens), so they are generated once, in
chunks of `CHUNK` prompts written as they finish: an interrupted run resumes
at the first missing chunk, and every drafter of one target (AR, DFlash,
D²SD's VP) reads the same cache. The hidden states at the requested target
layers come from the same KV-cached pass (`ar_batch`'s taps), not from a
second forward over the finished sequences.

Prompts come from `data.source`: "arith" (the synthetic task, raw prompts)
or "gsm8k" (questions of a GSM8K-format jsonl, by default the *train* split,
as `Question: …\\nAnswer:`, rendered with the target's chat template when
`data.chat` is true, the default), so the drafter sees exactly the prompts
`diffspec eval --task gsm8k --chat` gives the target.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..decoding.meter import CostMeter, MeteredModel
from ..decoding.runner import eos_ids, model_device
from ..models.causal import Qwen3Model, load_causal
from ..models.checkpoint import CheckpointError, load_tokenizer
from ..models.gguf import resolve_checkpoint
from ..models.tokenizer import Tokenizer
from ..speculative.ar import ARConfig, ar_batch, run_rows
from ..tasks import _read_jsonl, arith_examples, default_data_dir, gsm8k_prompt
from .common import shared_tokenizer

SOURCES = ("arith", "gsm8k")
CHUNK = 64
Seq = tuple[list[int], list[int]]  # (prompt ids, target answer ids, EOS included when emitted)


def source_prompts(dcfg: dict[str, Any], n_train: int, n_val: int, seed: int, target_dir: Path | None
                   ) -> tuple[list[str], list[str]]:
    """(train prompts, held-out validation prompts) from the config's `data` section."""
    source = str(dcfg.get("source", "arith"))
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {', '.join(map(repr, SOURCES))}; got {source!r}")
    if source == "arith":
        if "questions" in dcfg or "chat" in dcfg or "system" in dcfg:
            raise ValueError("data.questions, data.chat and data.system apply to data.source 'gsm8k'")
        return ([e.prompt for e in arith_examples("train", n_train, seed=seed)],
                [e.prompt for e in arith_examples("validation", n_val, seed=0)])
    path = Path(dcfg.get("questions") or default_data_dir() / "gsm8k" / "train.jsonl")
    rows = _read_jsonl(path)
    if rows and "question" not in rows[0]:
        raise ValueError(f"{path} rows need a 'question' field (GSM8K format)")
    if n_train + n_val > len(rows):
        raise ValueError(f"data.pool ({n_train}) + train.eval_n ({n_val}) exceeds the {len(rows)} questions "
                         f"in {path}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    # Validation from the end of the shuffled list, training from its start: a larger pool keeps
    # both, so the cached chunks of a smaller one stay valid.
    prompts = [gsm8k_prompt(rows[i]["question"]) for i in order[:n_train] + order[len(order) - n_val:]]
    if dcfg.get("chat", True):
        if target_dir is None:
            raise ValueError("data.chat needs the target's checkpoint directory (its chat template)")
        from ..models.chat import ChatTemplate

        template = ChatTemplate.from_pretrained(target_dir)
        head = [{"role": "system", "content": dcfg["system"]}] if dcfg.get("system") else []
        prompts = [template.render(head + [{"role": "user", "content": p}]) for p in prompts]
    return prompts[:n_train], prompts[n_train:]


# ---------------------------------------------------------------- the target


def target_tokenizer(cfg: dict[str, Any]) -> Tokenizer:
    """`tokenizer_from`'s tokenizer (the arith models' shared one), else the target's own."""
    if cfg.get("tokenizer_from"):
        return shared_tokenizer(cfg)
    return load_tokenizer(target_dir(cfg))


def target_dir(cfg: dict[str, Any]) -> Path:
    if not cfg.get("target"):
        raise ValueError("the training config lacks 'target': the AR target checkpoint directory the drafter serves")
    path = resolve_checkpoint(cfg["target"])  # 'smollm2' and .gguf files -> a directory
    if not Path(path).is_dir():
        raise CheckpointError(f"target checkpoint {path} does not exist; train it first (diffspec train ar)")
    return Path(path)


def load_target(cfg: dict[str, Any], tok: Tokenizer, device: torch.device) -> Qwen3Model:
    """The frozen AR target the config names, checked to read `tok`'s ids."""
    path = target_dir(cfg)
    target, ttok = load_causal(path, device=device, dtype=torch.float32)
    if ttok.fingerprint() != tok.fingerprint():
        raise ValueError(f"the target {path} uses another tokenizer than tokenizer_from "
                         f"({cfg.get('tokenizer_from') or 'the bundled llada-arith'}); every model must share one")
    return target.requires_grad_(False).eval()


def continuation_meta(cfg: dict[str, Any], target: Qwen3Model, path: Path) -> dict[str, Any]:
    """What identifies a target's continuations: its path, config and weight files' sizes and dates."""
    files = sorted(path.glob("*.safetensors"))
    return {"target": str(path.resolve()), "target_config": target.config.to_hf_dict(),
            "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _generate_chunk(target: torch.nn.Module, tok: Tokenizer, prompts: list[str], gen_length: int,
                    layers: Sequence[int] | None, hidden_dtype: torch.dtype, batch_size: int
                    ) -> tuple[list[Seq], list[Tensor] | None]:
    cfg = ARConfig(gen_length=gen_length, batch_size=batch_size)
    meter = CostMeter()
    metered = MeteredModel(target, meter, meter.primary)
    eos = eos_ids(target)
    gen = torch.Generator(device=model_device(target)).manual_seed(cfg.seed)
    hidden: list[Tensor] | None = [] if layers is not None else None
    # Prompts of similar length batch with little padding; the results go back to prompt order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    res = run_rows(target, tok, [prompts[i] for i in order], cfg, meter,
                   lambda rows: ar_batch(metered, rows, cfg, eos, gen, layers, hidden), "target", False)
    seqs: list[Seq | None] = [None] * len(prompts)
    hid: list[Tensor | None] = [None] * len(prompts)
    for k, i in enumerate(order):
        seqs[i] = (tok.encode(prompts[i]), list(res.raw_ids[k]))
        if hidden is not None:
            h = hidden[k].to(hidden_dtype)
            if not torch.isfinite(h).all():
                raise ValueError(f"target hidden states overflow {hidden_dtype}; set data.hidden_dtype to float32")
            hid[i] = h
    return seqs, (hid if hidden is not None else None)  # type: ignore[return-value]


def write_manifest_chunk(path: Path, fingerprint: str, seqs: list[Seq], seconds: float) -> None:
    """The answers of one chunk as small gzipped JSON (no hidden states): what git keeps of a cache."""
    body = json.dumps({"prompts": fingerprint, "answers": [a for _, a in seqs], "seconds": round(seconds, 1)},
                      separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:  # mtime 0: same bytes every time
        z.write(body)
    tmp.replace(path)


def read_manifest_chunk(path: Path) -> dict[str, Any]:
    try:
        with gzip.open(path, "rt") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable manifest chunk ({e}); restore it from git or delete it") from None


def replay_hidden(target: torch.nn.Module, seqs: list[Seq], layers: Sequence[int], hidden_dtype: torch.dtype
                  ) -> list[Tensor]:
    """The hidden states `ar_batch` taps, recomputed from finished sequences in one causal pass each.

    A cache lost with its machine is rebuilt from the committed answers this way in seconds per
    chunk instead of regenerating them (minutes); the values match the KV-cached pass's up to
    float rounding (one forward over the whole sequence instead of one per token).
    """
    dev = model_device(target)
    out = []
    for p, a in seqs:
        ids = torch.tensor([p + a[:-1]], device=dev)
        res = target(ids, hidden_layers=list(layers))
        out.append(torch.cat(res.hidden_states, dim=-1)[0].cpu().to(hidden_dtype))
    return out


@torch.inference_mode()
def cached_continuations(cache_dir: Path, meta: dict[str, Any], target: torch.nn.Module, tok: Tokenizer,
                         prompts: list[str], gen_length: int, layers: Sequence[int] | None = None,
                         hidden_dtype: torch.dtype = torch.float16, batch_size: int = 32,
                         desc: str = "target continuations", manifest: Path | None = None,
                         shard: tuple[int, int] | None = None, only_new: bool = False
                         ) -> tuple[list[Seq], list[Tensor] | None]:
    """(prompt ids, greedy answer ids) per prompt, and with `layers` the target's hidden states at
    those layers per sequence ((T, len·H): the prompt and every answer token but the last).

    Chunks already in `cache_dir` are read, missing ones generated and written (a larger pool
    extends a cache); a cache made for another target, length or layer set, or a chunk made for
    other prompts, is refused with the directory to delete. With `manifest` (a directory kept in
    git), each generated chunk's answers are also written there, and a chunk missing from the
    cache but present in the manifest is rebuilt from its answers (`replay_hidden`) instead of
    being generated again. With `shard` (i, n) only chunks c with c % n == i are made or read, and
    only they are returned: n processes of one thread each fill one cache faster than one process
    of n threads (batch-32 SmolLM2 steps: two threads run 1.5x one, not 2x). With `only_new`
    (generating data, not training) a chunk already made (in the cache or the manifest) is neither
    read, replayed nor returned: on a fresh machine replaying SmolLM2's hidden states costs about a
    minute a chunk, and reading them all holds gigabytes. Cached chunks are memory-mapped, so
    trainers reading one cache at the same time share its pages.
    """
    cache_dir = Path(cache_dir)
    full_meta = {**meta, "gen_length": gen_length, "layers": list(layers) if layers is not None else None,
                 "hidden_dtype": str(hidden_dtype), "chunk": CHUNK}
    meta_file = cache_dir / "meta.json"
    seconds, gen_layers, hidden_dtype = _open_cache(cache_dir, full_meta, layers, hidden_dtype)
    seqs: list[Seq] = []
    hidden: list[Tensor] | None = [] if layers is not None else None
    n_chunks = (len(prompts) + CHUNK - 1) // CHUNK
    bar = tqdm(total=len(prompts), desc=desc)
    for c in range(n_chunks):
        f = cache_dir / f"chunk-{c:05d}.pt"
        part = prompts[c * CHUNK:(c + 1) * CHUNK]
        mf = manifest / f"chunk-{c:05d}.json.gz" if manifest is not None else None
        if only_new and f.is_file() and mf is not None and not mf.is_file():
            _load_chunk(f, part, mf, cache_dir)  # made by a reader without a manifest: give git its answers
        if (shard is not None and c % shard[1] != shard[0]) or \
                (only_new and (f.is_file() or (mf is not None and mf.is_file()))):
            bar.update(len(part))
            continue
        if f.is_file():
            st = _load_chunk(f, part, mf, cache_dir)
        else:
            t0 = time.time()
            if mf is not None and mf.is_file():
                s, h = _from_manifest(mf, part, tok, target, gen_layers, hidden_dtype)
            else:
                s, h = _generate_chunk(target, tok, part, gen_length, gen_layers, hidden_dtype, batch_size)
                if mf is not None:
                    write_manifest_chunk(mf, _fingerprint(part), s, time.time() - t0)
            st = {"prompts": _fingerprint(part), "seqs": s, "hidden": h}
            tmp = f.with_suffix(f".{os.getpid()}.tmp")  # written aside and renamed: a reader (or a mapped
            torch.save(st, tmp)  # copy of an older file) never sees a half-written chunk
            tmp.replace(f)
            if meta_file.is_file():  # keep the cache maker's layer set, and the seconds other shards added
                old = json.loads(meta_file.read_text())
                full_meta, seconds = old["meta"], float(old.get("seconds", 0.0))
            seconds += time.time() - t0
            tmp = meta_file.with_suffix(f".{os.getpid()}.tmp")  # shards write it in turn
            tmp.write_text(json.dumps({"meta": full_meta, "seconds": seconds, "chunks_done":
                                       len(list(cache_dir.glob("chunk-*.pt")))}, indent=2, default=str) + "\n")
            tmp.replace(meta_file)
        seqs.extend(st["seqs"])
        if hidden is not None:
            if st["hidden"] is None:
                raise ValueError(f"{f} holds no hidden states (made for an AR drafter); delete {cache_dir} or point "
                                 "data.cache elsewhere")
            hidden.extend(st["hidden"])
        bar.update(len(part))
    bar.close()
    if not meta_file.is_file():  # every chunk was there already (copied caches)
        tmp = meta_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"meta": full_meta, "seconds": seconds}, indent=2, default=str) + "\n")
        tmp.replace(meta_file)
    print(f"target continuations: {len(seqs)} in {cache_dir} ({seconds / 60:.1f} min of generation in all)")
    return seqs, hidden


def _from_manifest(mf: Path, part: list[str], tok: Tokenizer, target: torch.nn.Module,
                   layers: Sequence[int] | None, hidden_dtype: torch.dtype) -> tuple[list[Seq], list[Tensor] | None]:
    """A chunk rebuilt from its committed answers: the ids, and with `layers` the replayed hidden states."""
    kept = read_manifest_chunk(mf)
    if kept.get("prompts") != _fingerprint(part) or len(kept.get("answers", [])) != len(part):
        raise ValueError(f"{mf} holds answers to other prompts (another data source, seed or chat "
                         "setting); delete it or point data.manifest elsewhere")
    s = [(tok.encode(q), list(a)) for q, a in zip(part, kept["answers"])]
    return s, (replay_hidden(target, s, layers, hidden_dtype) if layers is not None else None)


def _open_cache(cache_dir: Path, full_meta: dict[str, Any], layers: Sequence[int] | None,
                hidden_dtype: torch.dtype) -> tuple[float, Sequence[int] | None, torch.dtype]:
    """(generation seconds so far, the layer set and dtype new chunks are made with) of the cache in
    `cache_dir`, created when absent; a cache made for another target, length or layer set is
    refused. A reader of token ids only (`layers` None, the AR drafter) takes any layer set's cache
    and extends it with that layer set."""
    meta_file = cache_dir / "meta.json"
    if not meta_file.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        return 0.0, layers, hidden_dtype
    old = json.loads(meta_file.read_text())
    want = json.loads(json.dumps(full_meta, default=str))
    gen_layers = layers
    if layers is None:
        for k in ("layers", "hidden_dtype"):
            want[k] = old.get("meta", {}).get(k)
        gen_layers = want["layers"]
        hidden_dtype = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32)}.get(
            want["hidden_dtype"], hidden_dtype)
    if old.get("meta") != want:
        raise ValueError(f"{cache_dir} holds continuations made for another target, gen_length or layer set; "
                         "delete it (or point data.cache elsewhere) to regenerate")
    return float(old.get("seconds", 0.0)), gen_layers, hidden_dtype


def _load_chunk(f: Path, part: list[str], mf: Path | None, cache_dir: Path) -> dict[str, Any]:
    """A cached chunk, refused when made for other prompts; its answers are copied to the manifest
    when that lacks them."""
    st = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
    if st.get("prompts") != _fingerprint(part):
        raise ValueError(f"{f} was generated for other prompts (another data source, seed or chat "
                         f"setting); delete {cache_dir} (or point data.cache elsewhere) to regenerate")
    if mf is not None and not mf.is_file() and len(st["seqs"]) == len(part):
        write_manifest_chunk(mf, st["prompts"], st["seqs"], 0.0)
    return st


def manifest_counts(manifest: Path, answers: int | None = None) -> tuple[dict[int, int], int]:
    """Token counts over the answers of a manifest split directory (its first `answers`, in chunk
    order, when given: a vocabulary that does not change as more chunks are made), and how many."""
    files = sorted(Path(manifest).glob("chunk-*.json.gz"))
    if not files:
        raise FileNotFoundError(f"no manifest chunks (chunk-*.json.gz) in {manifest}; generate them with "
                                "`diffspec train dflash --config ... --data-only` and data.manifest set")
    counts: dict[int, int] = {}
    n = 0
    for f in files:
        for ans in read_manifest_chunk(f)["answers"]:
            if answers is not None and n >= answers:
                return counts, n
            n += 1
            for t in ans:
                counts[t] = counts.get(t, 0) + 1
    if answers is not None and n < answers:
        raise ValueError(f"{manifest} holds {n} answers, fewer than the {answers} asked for; make more chunks "
                         "or ask for fewer")
    return counts, n


def build_draft_vocab(drafter_dir: Path, manifest: Path, size: int, answers: int | None = None) -> dict[str, Any]:
    """Write `drafter_dir`/draft_vocab.json from the target's own answers in `manifest`/train (the first
    `answers` of them when given), and measure on `manifest`/val (when present) the share of answer
    tokens the vocabulary covers: a token outside it can never be drafted, so that share bounds every
    draft's acceptance."""
    from ..models.draft_vocab import write_draft_vocab

    if not (Path(drafter_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{drafter_dir} is not a drafter checkpoint directory (no config.json)")
    if answers is not None and (isinstance(answers, bool) or not isinstance(answers, int) or answers < 1):
        raise ValueError(f"answers must be a whole number >= 1 (or None: all), got {answers!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a whole number >= 1, got {size!r}")
    counts, n = manifest_counts(Path(manifest) / "train", answers)
    if not counts:
        raise ValueError(f"the answers in {manifest}/train hold no tokens: nothing to make a vocabulary of")
    ids = write_draft_vocab(drafter_dir, counts, size)
    report: dict[str, Any] = {"size": len(ids), "answers": n, "distinct_tokens": len(counts),
                              "train_coverage": sum(counts.get(i, 0) for i in ids) / max(1, sum(counts.values()))}
    if (Path(manifest) / "val").is_dir():
        val, _ = manifest_counts(Path(manifest) / "val")
        keep = set(ids)
        report["val_coverage"] = sum(c for t, c in val.items() if t in keep) / max(1, sum(val.values()))
    return report

