"""The batching engine: one worker thread decodes queued requests together, streaming each row's final text.

Requests whose decoding settings agree (`Job.key`: the method and its whole
config but the batch size, and the seed when nothing is sampled) wait in one
queue; the worker takes the oldest queue once its first job has waited the
collection window (or the queue holds a full batch), and decodes up to
`max_batch` rows in one canvas. Requests with other settings wait in their own
queues. A request that samples (temperature > 0, random remasking, Dream's
sampler) is decoded alone, so its seed reproduces `diffspec.api.generate`, and so is
a request whose method does not batch (`Method.batches`).

How text reaches a client while its batch decodes, without touching the decoders:

- vanilla / fast-dllm / dkv-cache: the engine runs `BlockDecoder` itself, one
  step at a time, and after each step hands every row its final prefix (every
  cell up to the first masked one). Rows that are done (EOS or a stop string
  reached, client gone, request timed out) leave the canvas at the next step for
  the caches that keep their state per row and rebuild it at a block start
  (none, prefix, dual, dkv-decode): at a block start a fresh decoder on the
  remaining rows computes exactly what the old one would, inside a block the
  decoder and its KV store are cut down to those rows (`_keep_rows`). The batch
  ends as soon as every row is done. A job cancelled while queued leaves the
  queue at once (`Engine.cancel`), freeing its rows' capacity.
- psd / dualdiffusion: their loops are called as they are, with a model wrapper
  that looks at the canvas before each forward (PSD never takes back a
  committed cell; DualDiffusion's cells are final once an iteration begins, i.e.
  at a drafter forward that follows a verifier forward), and that ends the
  loop early once every row is done.
- ar: the plain AR loop is called with a model wrapper that reads each step's
  new tokens from the forward's input (token-by-token streaming).
- every other method (ar-spec, dflash, d2sd, dream, and any method registered
  later): the method's own `run`, each answer sent as one chunk when the batch
  ends (their loops keep accepted tokens in local variables; a progress hook in
  the core would let them stream too).

Tokens generated mean one thing everywhere (`TextStream.completion_tokens`, the
library meter's `answer_length`): a decoded row's answer through its first EOS,
the EOS included, or through the stop string that ended it. The batch's meter and
`EngineStats.tokens_generated` add each decoded row once; a request's usage
reports its rows' sum as `diffspec.tokens_generated` and divides it by the
primary model's forwards of those rows for `diffspec.tokens_per_forward` (the
meter's TPF). OpenAI's `completion_tokens` counts every choice: it equals
`tokens_generated` except for greedy `n` > 1, whose choices share one row.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..decoding.config import DecodeConfig
from ..decoding.meter import CostMeter, MeteredModel
from ..decoding.state import Canvas
from ..methods import get_method
from .errors import ApiError, queue_full, server_error
from .text import TextStream

log = logging.getLogger("diffspec.serve")

# Caches whose decoder state is rebuilt from scratch at every block start (a full refresh of every
# row), so rows may leave the canvas there without changing what the others decode; their state is
# also kept per row in between, so rows may leave at any step (`_keep_rows`).
ROW_DROP_CACHES = ("none", "prefix", "dual", "dkv-decode")
# A method batches (`Method.batches`) when its rows decode in one canvas exactly as each would
# alone (checked against `generate` one prompt at a time) and share their forwards. Every other
# method decodes each request alone: DualDiffusion's rows advance in lockstep (one iteration budget
# and drafter clock per canvas), so a companion changes a row's answer; ar-spec, dflash and d2sd
# decode rows one at a time anyway, so a batch would only delay its first answers.


class _AllDone(Exception):
    """Raised from a model wrapper to end a decoding loop whose rows are all done."""


class ObservedModel(MeteredModel):
    """A MeteredModel that calls `before(name, input_ids)` before each forward (and charges it as usual)."""

    def __init__(self, model: torch.nn.Module, meter: CostMeter, name: str,
                 before: Callable[[str, torch.Tensor], None]):
        super().__init__(model, meter, name)
        self.before = before

    def __call__(self, input_ids: torch.Tensor, *, sequences: int | None = None, **kw: Any):
        self.before(self.name, input_ids)
        return super().__call__(input_ids, sequences=sequences, **kw)


def uses_rng(cfg: Any) -> bool:
    """Whether decoding `cfg` draws random numbers (then a row's draws depend on its batch companions)."""
    if type(cfg).__name__ == "DreamDecodeConfig":
        return True  # alg 'origin' reveals cells at random; treat every Dream run as sampled
    d = getattr(cfg, "decode", cfg)
    return getattr(d, "temperature", 0) > 0 or getattr(d, "remasking", "low_confidence") == "random"


def _strip(d: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v, keys) for k, v in d.items() if k not in keys}
    return d


def batch_key(method: str, cfg: Any) -> str:
    """Jobs with equal keys may share a canvas: same method and config, batch size aside (and the
    seed aside when nothing is sampled)."""
    drop = ("batch_size",) if uses_rng(cfg) else ("batch_size", "seed")
    return method + ":" + json.dumps(_strip(cfg.to_dict(), drop), sort_keys=True, default=str)


def _keep_rows(decoder: Any, canvas: Canvas, idx: torch.Tensor) -> bool:
    """Cut a BlockDecoder down to the rows `idx` in the middle of a block, in place: its canvas becomes
    `canvas` (those rows), and its cache keeps exactly those rows' state. False (nothing changed) for
    a cache this does not know.

    Exact, because nothing in these decoders couples rows: without a cache the state is the canvas,
    the block and the step in it; the cached strategies keep K/V, validity and refresh clocks per
    row, and a row attends exactly to what it would attend to alone, whatever its companions need
    (`decoding.cache.KVStore`). Taking rows out leaves the others' state untouched."""
    from ..decoding.cache import DKVDecode, DualCache, NoCache, PrefixCache

    cache = decoder.cache
    if type(cache) in (PrefixCache, DualCache, DKVDecode):
        store = cache.store
        store.k = [None if t is None else t[idx] for t in store.k]
        store.v = [None if t is None else t[idx] for t in store.v]
        store.valid, store.token = store.valid[idx], store.token[idx]
        cache.row_steps, cache.block_steps = cache.row_steps[idx], cache.block_steps[idx]
        cache.last_need = cache.last_need[idx]
    elif type(cache) is not NoCache:
        return False
    decoder.canvas = cache.canvas = canvas
    return True


def gen_length_of(cfg: Any) -> int:
    return int(cfg.gen_length)


# ---------------------------------------------------------------- jobs, rows, choices

_ids = itertools.count(1)


@dataclass
class Prompt:
    text: str
    ids: list[int]


class Job:
    """One HTTP request: its prompts × n choices, its validated config, and a channel back to the client.

    Events go to an asyncio queue on the server's loop: ("delta", choice, text),
    ("finish", choice, reason), ("done", usage) or ("error", ApiError)."""

    def __init__(self, method: str, cfg: Any, prompts: Sequence[Prompt], n: int, stops: Sequence[str],
                 eos_ids: Sequence[int], loop: asyncio.AbstractEventLoop | None, info: dict[str, Any] | None = None):
        self.id = next(_ids)
        self.method, self.cfg, self.prompts, self.n, self.stops = method, cfg, list(prompts), n, list(stops)
        self.eos_ids = tuple(eos_ids)
        self.sampled = uses_rng(cfg)
        self.solo = self.sampled or not get_method(method).batches  # decoded alone
        self.key = batch_key(method, cfg) + (f"#solo{self.id}" if self.solo else "")
        # A sampled job decodes one row per choice (generate([p] * n) with its seed); a greedy one
        # decodes each prompt once and gives every choice of it the same text.
        self.n_rows = len(self.prompts) * (n if self.sampled else 1)
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue() if loop is not None else None  # type: ignore[assignment]
        self.info = info or {}
        self.cancelled = False
        self.created = time.monotonic()
        self.started: float | None = None
        self.streams: dict[int, TextStream] = {}
        self.finished_choices = 0
        self.done = False
        self.emitted = False
        self.sink: Callable[[tuple], None] | None = None  # tests / in-process use: receive events directly

    @property
    def n_choices(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """The client went away: its rows stop being decoded (and leave the canvas where the method allows)."""
        self.cancelled = True

    def emit(self, *event: Any) -> None:
        self.emitted = True
        if self.sink is not None:
            self.sink(event)
            return
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is closed: nobody is listening any more
            self.cancelled = True

    def fail(self, err: ApiError) -> None:
        if not self.done:
            self.done = True
            self.emit("error", err)


class Row:
    """One canvas row: a prompt and the choices (of one job) that read its text."""

    def __init__(self, job: Job, prompt: Prompt, choices: list[int], decode: Callable[[list[int]], str]):
        self.job, self.prompt, self.choices = job, prompt, choices
        for c in choices:
            job.streams[c] = TextStream(decode, job.stops, job.eos_ids)
        self.final_len = -1
        self.freed = False
        self.forwards = 0  # primary-model forwards until the row's answer was done (set when it is)

    @property
    def tokens_generated(self) -> int:
        """The row's answer through its first EOS or stop string: every choice of a row reads the same
        ids, so the first choice's count is the row's (counted once, however many choices share it)."""
        return self.job.streams[self.choices[0]].completion_tokens

    @property
    def done(self) -> bool:
        return self.job.cancelled or self.job.done or all(self.job.streams[c].finished for c in self.choices)


class Batch:
    """Rows decoded together, with the meter their forwards charge."""

    def __init__(self, jobs: list[Job], decode: Callable[[list[int]], str], stats: "EngineStats | None" = None):
        self.jobs, self.stats, self._counted = jobs, stats, 0
        self.method, self.cfg = jobs[0].method, jobs[0].cfg
        self.sampled = jobs[0].sampled
        self.rows: list[Row] = []
        for job in jobs:
            for p_i, prompt in enumerate(job.prompts):
                choices = [p_i * job.n + j for j in range(job.n)]
                if job.sampled:
                    self.rows.extend(Row(job, prompt, [c], decode) for c in choices)
                else:
                    self.rows.append(Row(job, prompt, choices, decode))
        self.meter = CostMeter()
        self.t0 = time.perf_counter()

    def feed(self, row: Row, ids: Sequence[int], complete: bool, text: str | None = None) -> None:
        """Row `row`'s final prefix is `ids`: send every choice its new text, finish what finished."""
        job = row.job
        if job.done or job.cancelled:
            return
        for c in row.choices:
            stream = job.streams[c]
            if stream.finished:
                continue
            delta = stream.update(ids, complete, text)
            if delta:
                job.emit("delta", c, delta)
            if stream.finished:
                job.emit("finish", c, stream.finish_reason)
                if c == row.choices[0]:
                    self._count_tokens(row)
                job.finished_choices += 1
        if job.finished_choices == job.n_choices and not job.done:
            job.done = True
            self.count_forwards()  # before the client hears "done" (and may read /health)
            job.emit("done", self.usage(job))

    def _count_tokens(self, row: Row) -> None:
        """The row's answer is done: its tokens go to the meter and the server's totals, once."""
        self.meter.tokens_generated += row.tokens_generated
        primary = self.meter.models.get(self.meter.primary)
        row.forwards = primary.nfe if primary is not None else 0  # a shared canvas's rows are in every forward
        if self.stats is not None:
            self.stats.tokens_generated += row.tokens_generated

    def count_forwards(self) -> None:
        """Add this batch's forwards since the last call to the server's totals."""
        if self.stats is not None:
            nfe = self.meter.nfe
            self.stats.forwards += nfe - self._counted
            self._counted = nfe

    def tokens_per_forward(self, job: Job) -> float:
        """The meter's TPF for `job`'s rows: their tokens generated over the primary model's forwards
        they took part in. Alone in its batch, the batch's meter is the job's (exact for every method,
        rows decoded one at a time or leaving the canvas included); sharing a canvas (batched methods
        only), each row was in every forward until its answer was done."""
        if all(j is job for j in self.jobs):
            return self.meter.tokens_per_forward
        rows = [r for r in self.rows if r.job is job]
        forwards = sum(r.forwards for r in rows)
        return sum(r.tokens_generated for r in rows) / forwards if forwards else 0.0

    def usage(self, job: Job) -> dict[str, Any]:
        """OpenAI usage plus diffspec's meter (whole-batch forwards and FLOPs so far, shared by its rows).
        Token counts follow the module's one definition (see the module docstring)."""
        completion = sum(s.completion_tokens for s in job.streams.values())
        generated = sum(r.tokens_generated for r in self.rows if r.job is job)
        prompt = sum(len(p.ids) for p in job.prompts)
        meter = self.meter.summary()
        meter["wall_seconds"] = time.perf_counter() - self.t0
        meter["sequences"] = len(self.rows)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "diffspec": {
                "method": job.method,
                "gen_length": gen_length_of(job.cfg),
                "batch_rows": len(self.rows),
                "forwards": meter["nfe"],
                "tokens_generated": generated,
                "tokens_per_forward": self.tokens_per_forward(job),
                "queue_seconds": (job.started or job.created) - job.created,
                "meter": meter,
            },
        }


# ---------------------------------------------------------------- the engine


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0  # started
    batches_done: int = 0  # finished (one worker: batches - batches_done is the one in flight, if any)
    rows: int = 0
    forwards: int = 0
    errors: int = 0
    rejected: int = 0
    cancelled: int = 0  # jobs whose client left while they waited in the queue
    freed_rows: int = 0  # canvas rows that stopped being decoded early because their client left
    rows_left_early: int = 0  # freed rows taken out of a running canvas while its other rows went on decoding
    max_rows_in_batch: int = 0
    tokens_generated: int = 0  # each decoded row's answer through its first EOS or stop string (see above)
    busy_seconds: float = 0.0
    started: float = field(default_factory=time.time)


class Engine:
    """Queues jobs by batch key and decodes them on one worker thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 16, batch_window: float = 0.01,
                 max_queue: int = 256, dtype: str | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not batch_window >= 0:
            raise ValueError(f"batch_window must be >= 0 seconds, got {batch_window}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.max_batch, self.batch_window, self.max_queue = max_batch, batch_window, max_queue
        self.device = next(model.parameters()).device
        self.cond = threading.Condition()
        self.queues: dict[str, deque[Job]] = {}
        self.queued_rows = 0
        self.stats = EngineStats()
        self._batch_seconds = 0.5  # running estimate, for Retry-After
        self._stop = False
        self._thread: threading.Thread | None = None
        self._drafters: dict[tuple, Any] = {}
        self._batch: Batch | None = None  # the batch being decoded (read by /metrics)
        self._current: list[Job] = []  # the jobs the worker took (set under `cond`; failed by abort_all)

    # -- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._worker, name="diffspec-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self._stop = True
            pending = [j for q in self.queues.values() for j in q]
            self.queues.clear()
            self.queued_rows = 0
            self.cond.notify_all()
        for job in pending:
            job.fail(ApiError(503, "the server is shutting down", "server_error", None, "shutting_down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- admission

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise a 429 ApiError (with Retry-After) when the queue is full."""
        with self.cond:
            if self._stop:
                raise ApiError(503, "the server is shutting down", "server_error", None, "shutting_down")
            if self.queued_rows + job.n_rows > self.max_queue:
                self.stats.rejected += 1
                batches_ahead = self.queued_rows / self.max_batch + 1
                raise queue_full(max(1, math.ceil(self._batch_seconds * batches_ahead)), self.queued_rows)
            self.queues.setdefault(job.key, deque()).append(job)
            self.queued_rows += job.n_rows
            self.stats.requests += 1
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client left or its request's timeout passed: the job's rows stop being decoded (they leave a
        running canvas at its next step or block start, see `_run_blocks`), and a job still in the queue
        leaves it now, so its rows free the queue's capacity at once."""
        job.cancel()
        with self.cond:
            q = self.queues.get(job.key)
            if q is not None and any(j is job for j in q):
                q.remove(job)
                self.queued_rows -= job.n_rows
                self.stats.cancelled += 1
                if not q:
                    del self.queues[job.key]
                self.cond.notify_all()

    def queue_depth(self) -> int:
        with self.cond:
            return self.queued_rows

    def flush(self) -> None:
        """Stop waiting for companions (draining: no new request will come): queued jobs start at once."""
        with self.cond:
            self.batch_window = 0.0
            self.cond.notify_all()

    def running_rows(self) -> int:
        """Rows of the batch being decoded whose answers are not done yet (0 when the worker is idle)."""
        batch = self._batch
        return sum(1 for r in batch.rows if not r.done) if batch is not None else 0

    def abort_all(self, err: ApiError) -> int:
        """Fail every queued job and every unfinished job of the running batch with `err` (their rows are
        done from now on, so the running batch ends at its next step); the number of jobs failed."""
        with self.cond:
            pending = [j for q in self.queues.values() for j in q]
            self.queues.clear()
            self.queued_rows = 0
            running = list(self._current)
        failed = 0
        for job in pending + running:
            if not job.done and not job.cancelled:
                job.fail(err)
                failed += 1
        return failed

    def _take(self) -> list[Job] | None:
        """Wait for the next batch: the oldest queue, once its head waited the window or it fills a batch."""
        with self.cond:
            while True:
                if self._stop:
                    return None
                for key in list(self.queues):
                    q = self.queues[key]
                    while q and q[0].cancelled:
                        self.queued_rows -= q.popleft().n_rows
                        self.stats.cancelled += 1
                    if not q:
                        del self.queues[key]
                if not self.queues:
                    self.cond.wait()
                    continue
                key = min(self.queues, key=lambda k: self.queues[k][0].created)
                q = self.queues[key]
                rows = sum(j.n_rows for j in q)
                wait = q[0].created + self.batch_window - time.monotonic()
                if rows < self.max_batch and wait > 0 and not q[0].solo:
                    self.cond.wait(wait)
                    continue
                jobs: list[Job] = []
                taken = 0
                while q and (not jobs or taken + q[0].n_rows <= self.max_batch):
                    job = q.popleft()
                    self.queued_rows -= job.n_rows
                    if job.cancelled:
                        self.stats.cancelled += 1
                        continue
                    jobs.append(job)
                    taken += job.n_rows
                if not q:
                    del self.queues[key]
                if jobs:
                    self._current = jobs
                    return jobs

    # -- the worker

    def _worker(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            t0 = time.perf_counter()
            try:
                self.run_jobs(jobs)
            except BaseException:  # never let the worker die: every job gets an answer
                log.error("engine worker failed:\n%s", traceback.format_exc())
                for job in jobs:
                    job.fail(server_error("internal error while decoding; see the server log"))
            dt = time.perf_counter() - t0
            self.stats.busy_seconds += dt
            with self.cond:
                self._current = []
            self.stats.batches_done += 1
            self._batch_seconds = 0.7 * self._batch_seconds + 0.3 * dt

    def run_jobs(self, jobs: list[Job]) -> None:
        """Decode `jobs` as one batch; if that fails, each job that has received nothing yet alone,
        so one bad request never fails its companions."""
        try:
            self._run_batch(jobs)
            return
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            log.warning("a batch of %d requests failed (%s: %s); decoding them one by one",
                        len(jobs), type(e).__name__, e)
        for job in jobs:
            if job.done or job.cancelled:
                continue
            if job.emitted:
                self._fail(job, RuntimeError("the batch failed after this request's text had started"))
                continue
            try:
                self._run_batch([job])
            except Exception as e:
                self._fail(job, e)

    def _fail(self, job: Job, e: Exception) -> None:
        self.stats.errors += 1
        if isinstance(e, ApiError):
            err = e
        elif isinstance(e, (ValueError, NotImplementedError)):
            err = ApiError(400, str(e), "invalid_request_error", None, "invalid_options")
        else:
            log.error("decoding failed:\n%s", "".join(traceback.format_exception(e)))
            err = server_error(f"internal error while decoding ({type(e).__name__}: {e})")
        job.fail(err)

    def _run_batch(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            job.started = job.started or now
        batch = Batch(jobs, self._decode, self.stats)
        self._batch = batch
        try:
            self._decode_batch(batch, jobs)
        finally:
            self._batch = None

    def _decode_batch(self, batch: Batch, jobs: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(batch.rows)
        self.stats.max_rows_in_batch = max(self.stats.max_rows_in_batch, len(batch.rows))
        run = get_method(batch.method).run
        from ..methods.block import run_block
        from ..methods.dualdiffusion import run_dual
        from ..methods.psd import run_psd

        try:
            with torch.inference_mode(), batch.meter.timed(self.device):
                if run is run_block and isinstance(batch.cfg, DecodeConfig):
                    self._run_blocks(batch)
                elif run is run_psd:
                    self._run_psd(batch)
                elif run is run_dual:
                    self._run_dual(batch)
                elif batch.method == "ar":
                    self._run_ar(batch)
                else:
                    self._run_generic(batch)
        finally:
            batch.count_forwards()
        for row in batch.rows:  # a runner always finishes its rows; this is a safety net
            if not row.done:
                batch.feed(row, [], True)
        batch.count_forwards()
        for job in jobs:
            if not job.done and not job.cancelled:
                job.done = True
                job.emit("done", batch.usage(job))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- canvases

    def _canvas(self, batch: Batch, gen_length: int, max_positions: int | None = None) -> Canvas:
        mc = self.model.config
        return Canvas.from_prompts([r.prompt.ids for r in batch.rows], gen_length, mc.mask_token_id,
                                   mc.pad_token_id, max_positions or mc.max_sequence_length, self.device)

    def _publish(self, batch: Batch, canvas: Canvas, rows: list[Row], complete: bool = False) -> None:
        """Hand each row its final prefix: its generated cells up to the first masked one."""
        gen = canvas.x[:, canvas.prompt_len:]
        masked = gen == canvas.mask_id
        L = gen.shape[1]
        firsts = torch.where(masked.any(1), masked.int().argmax(1), torch.full_like(masked[:, 0], L, dtype=torch.long))
        for i, f in enumerate(firsts.tolist()):
            row = rows[i]
            if row.done or (f == row.final_len and not complete):
                continue
            row.final_len = f
            batch.feed(row, gen[i, :f].tolist(), complete or f == L)

    def _run_blocks(self, batch: Batch) -> None:
        """vanilla / fast-dllm / dkv-cache: BlockDecoder one step at a time; done rows (answer complete,
        client gone, timeout) leave the canvas at the next step for the caches that rebuild everything at
        a block start (none, prefix, dual, dkv-decode: see `_keep_rows`); with the other caches, and when
        anything is sampled, they stay until the batch ends."""
        from ..decoding.diffusion import BlockDecoder

        cfg: DecodeConfig = batch.cfg
        canvas = self._canvas(batch, cfg.gen_length)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        metered = MeteredModel(self.model, batch.meter, batch.meter.primary)
        decoder = BlockDecoder(metered, canvas, cfg, generator)
        live = list(batch.rows)
        # Rows may leave only where that changes nothing for the others: a cache rebuilt at every
        # block start, and no random draws (their order depends on the batch's shape).
        droppable = cfg.cache in ROW_DROP_CACHES and not batch.sampled
        while not all(r.done for r in live):
            b = decoder.current_block()
            if b is None:
                break
            if droppable and any(r.done for r in live):
                keep = [i for i, r in enumerate(live) if not r.done]
                idx = torch.tensor(keep, device=canvas.x.device)
                small = Canvas(canvas.x[idx].clone(), canvas.attention_mask[idx].clone(), canvas.prompt_len,
                               canvas.gen_length, canvas.mask_id)
                if b != decoder.block:  # a block start: a fresh decoder rebuilds what the old one would
                    decoder = BlockDecoder(metered, small, cfg, generator)
                elif not _keep_rows(decoder, small, idx):
                    small = None  # mid-block with a cache whose state cannot be cut: at the next block start
                if small is not None:
                    self.stats.rows_left_early += self._free(live)
                    canvas, live = small, [live[i] for i in keep]
            decoder.step()
            self._publish(batch, canvas, live)
        self._free(live)
        self._publish(batch, canvas, live, complete=True)

    def _free(self, rows: list[Row]) -> int:
        """Count the rows among `rows` that stop being decoded because their client left (or their
        request's timeout passed); how many there were."""
        n = 0
        for r in rows:
            if r.job.cancelled and not r.freed and not all(r.job.streams[c].finished for c in r.choices):
                r.freed = True
                self.stats.freed_rows += 1
                n += 1
        return n

    def _observer(self, batch: Batch, canvas: Canvas, final_at: Callable[[str], bool]) -> Callable:
        """A model wrapper's `before`: publish the final prefixes, and end the loop once every row is done."""
        def before(name: str, _ids: torch.Tensor) -> None:
            if final_at(name):
                self._publish(batch, canvas, batch.rows)
                if all(r.done for r in batch.rows):
                    self._free(batch.rows)
                    raise _AllDone
        return before

    def _run_psd(self, batch: Batch) -> None:
        """PSD's own loop; a committed cell is never taken back, so the canvas prefix is final at any forward."""
        from ..speculative.psd import psd_decode_canvas

        if getattr(self.model, "logits_shifted", False):
            raise ValueError(f"PSD compares logit i with token i; {type(self.model).__name__} shifts its logits")
        cfg = batch.cfg
        canvas = self._canvas(batch, cfg.gen_length)
        metered = ObservedModel(self.model, batch.meter, batch.meter.primary,
                                self._observer(batch, canvas, lambda name: True))
        try:
            psd_decode_canvas(metered, canvas, cfg)
        except _AllDone:
            pass
        self._publish(batch, canvas, batch.rows, complete=True)

    def _run_dual(self, batch: Batch) -> None:
        """DualDiffusion's own loop (as `dualdiffusion_generate` sets it up); cells are final when an
        iteration begins, i.e. at a drafter forward that follows a verifier forward."""
        from ..methods.dualdiffusion import resolve_drafter
        from ..speculative.core import DiffusionDrafter, FullForwardVerifier
        from ..speculative.dualdiffusion import check_compatible, dual_decode_canvas
        from ..speculative.rules import make_rule

        cfg = batch.cfg
        key = ("dual", cfg.drafter)
        if key not in self._drafters:
            self._drafters[key] = resolve_drafter(None, cfg, self.model)
        d_model, d_tok = self._drafters[key]
        d_model = self.model if d_model is None else d_model
        check_compatible(d_model, self.model, d_tok, self.tokenizer)
        rule = make_rule(cfg.rule, cfg.rule_threshold, cfg.verifier_unmask)
        dcfg = cfg.decode
        batch.meter.primary = "verifier"
        max_pos = min(self.model.config.max_sequence_length, d_model.config.max_sequence_length)
        canvas = self._canvas(batch, dcfg.gen_length, max_pos)
        last = [None]

        def final_at(name: str) -> bool:
            final = not rule.spec.needs_verifier or (name == "drafter" and last[0] != "drafter")
            last[0] = name
            return final

        before = self._observer(batch, canvas, final_at)
        d_metered = ObservedModel(d_model, batch.meter, "drafter", before)
        verifier = FullForwardVerifier(ObservedModel(self.model, batch.meter, "verifier", before))
        generator = torch.Generator(device=self.device).manual_seed(dcfg.seed)
        drafter = DiffusionDrafter(d_metered, canvas, dcfg, generator, keep_logprobs=rule.spec.needs_drafter_logprobs)
        try:
            dual_decode_canvas(drafter, verifier, rule, canvas, cfg)
        except _AllDone:
            pass
        self._publish(batch, canvas, batch.rows, complete=True)

    # -- AR targets

    def _run_ar(self, batch: Batch) -> None:
        """Plain AR decoding (`speculative.ar`'s batch loop); each forward's input holds the tokens just
        sampled, so every row streams token by token."""
        from ..decoding.runner import cut_at_eos, eos_ids
        from ..speculative.ar import ar_batch

        cfg = batch.cfg.decode
        eos = eos_ids(self.model)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        rows = batch.rows
        tokens: list[list[int]] = [[] for _ in rows]
        calls = [0]

        def before(name: str, input_ids: torch.Tensor) -> None:
            calls[0] += 1
            if calls[0] == 1 or input_ids.shape[1] != 1:
                return  # the prefill
            for i, t in enumerate(input_ids[:, 0].tolist()):
                if not rows[i].done:
                    tokens[i].append(t)
                    batch.feed(rows[i], tokens[i], False)
            if all(r.done for r in rows):
                self._free(rows)
                raise _AllDone

        metered = ObservedModel(self.model, batch.meter, batch.meter.primary, before)
        try:
            raw = ar_batch(metered, [r.prompt.ids for r in rows], cfg, eos, generator)
        except _AllDone:
            return
        for row, ids in zip(rows, raw):
            cut = cut_at_eos(ids, eos) if cfg.stop_at_eos else ids
            batch.feed(row, ids, True, self.tokenizer.decode(cut, skip_special_tokens=True))

    def _ar_drafters(self, batch: Batch) -> dict[str, Any]:
        """Loaded once and kept: the drafters an AR method's config names (or the bundled ones)."""
        from ..speculative import armethods as am

        cfg, method = batch.cfg, batch.method
        param = next(self.model.parameters())
        out: dict[str, Any] = {}
        if method == "ar-spec":
            key = ("ar-spec", cfg.drafter)
            if key not in self._drafters:
                self._drafters[key] = am.load_causal_or_default(
                    cfg.drafter, am.bundled_drafter("ar-spec", self.model), "drafter", param.device, param.dtype,
                    self.tokenizer, self.model)
            out["drafter"] = self._drafters[key]
        elif method in ("dflash", "d2sd"):
            key = ("dflash", cfg.drafter)
            if key not in self._drafters:
                self._drafters[key] = am.load_dflash_or_default(
                    cfg.drafter, am.bundled_drafter(method, self.model), "drafter", self.model)
            out["drafter"] = self._drafters[key]
            if method == "d2sd":
                key = ("vp", cfg.vp_drafter)
                if key not in self._drafters:
                    self._drafters[key] = am.load_dflash_or_default(
                        cfg.vp_drafter, am.bundled_drafter("vp", self.model), "vp drafter", self.model)
                out["vp_drafter"] = self._drafters[key]
        return out

    def _run_generic(self, batch: Batch) -> None:
        """Any other method: its own `run` over the batch; each answer arrives whole when the batch ends."""
        from ..api import build_config

        m = get_method(batch.method)
        cfg = build_config(batch.method, batch.cfg, strict=False, batch_size=len(batch.rows))
        models = self._ar_drafters(batch) if m.family == "ar" else {}
        res = m.run(self.model, self.tokenizer, [r.prompt.text for r in batch.rows], cfg, progress=False, **models)
        res.meter.tokens_generated = 0  # the rows' streams count them (feed), by the one definition
        batch.meter.merge(res.meter)
        batch.meter.primary = res.meter.primary
        batch.meter.wall_seconds = 0.0  # the batch's own clock covers it
        raw = res.raw_ids or res.token_ids
        for row, ids, text in zip(batch.rows, raw, res.texts):
            batch.feed(row, ids, True, text)
