"""The executor: one worker thread decodes the batches the scheduler gives it, streaming each row's final text.

The scheduler (`serve.scheduler`) keeps the queues by batch key and decides what runs next;
this module decodes a batch and turns what the decoding loops commit into each request's text
and usage (`Batch`, the output processing).

How text reaches a client while its batch decodes: one executor for every method.
It calls the method's own decode function (`Method.run`) on the batch's prompts
with a `BatchStreamer` (`decoding.streamer`): every decoding loop reports the
cells it has made final, and the streamer hands each row its final prefix (every
token up to the first one not final yet) as text. Once every row is done (EOS or
a stop string reached, client gone, request timed out) the streamer tells the
loop to stop. The block decoder (vanilla / fast-dllm / dkv-cache) also asks it
which rows are done and, for the caches that allow it, takes them out of its
canvas at the next step without changing the others (`decoding.diffusion.
keep_rows`). A job cancelled while queued leaves the queue at once
(`Scheduler.cancel`), freeing its rows' capacity. The models a method's roles name
beyond the target (drafters) are loaded once by its `Method.load` and kept.

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

import logging
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import torch

from ..decoding.meter import CostMeter
from ..decoding.streamer import Streamer
from ..methods import Method, get_method
from .errors import ApiError, server_error
from .scheduler import EngineStats, Job, Prompt, Scheduler, gen_length_of
from .text import TextStream

log = logging.getLogger("diffspec.serve")

# `Engine(batching=...)`, `diffspec serve --batching`. "auto" is step on CUDA and static on a CPU: a
# CPU forward of B rows costs B times one row's (benchmarks/serve-step-cpu/forward_cost.py), so a row
# that joins slows every step of its batch by its share and, with mixed traffic, static batching
# served 1.3x the requests (benchmarks/serve-soak-step-cpu).
BATCHING = ("auto", "step", "static")


def check_batching(batching: Any, prompt_bucket: Any, names: tuple[str, str] = ("batching", "prompt_bucket")) -> None:
    """The step-batching options, checked once for the library (`Engine`) and the CLI (`names`: its flags)."""
    if batching not in BATCHING:
        raise ValueError(f"{names[0]} must be one of {', '.join(BATCHING)}, got {batching!r}")
    if isinstance(prompt_bucket, bool) or not isinstance(prompt_bucket, int) or prompt_bucket < 1:
        raise ValueError(f"{names[1]} must be an integer >= 1 (tokens), got {prompt_bucket!r}")


JOIN_ROWS_PER_SLOT = 8  # step batching: a batch stops taking joiners once it has held 8 × --max-batch rows


# ---------------------------------------------------------------- rows and their output


class Row:
    """One canvas row: a prompt and the choices (of one job) that read its text."""

    def __init__(self, job: Job, prompt: Prompt, choices: list[int], decode: Callable[[list[int]], str]):
        self.job, self.prompt, self.choices = job, prompt, choices
        for c in choices:
            job.streams[c] = TextStream(decode, job.stops, job.eos_ids)
        self.final_len = -1
        self.freed = False
        self.forwards = 0  # primary-model forwards from its start until its answer was done (set when it is)
        self.nfe0 = 0  # the batch's primary-model forwards when the row started (it may join late)

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
        self.stats, self._counted = stats, 0
        self.method, self.cfg = jobs[0].method, jobs[0].cfg
        self.sampled = jobs[0].sampled
        self.decode = decode
        self.rows: list[Row] = []
        self.jobs: list[Job] = []
        self.meter = CostMeter()  # the method's run charges it (`_decode_batch`)
        self.tokens_counted = 0  # the finished rows' tokens generated (`_count_tokens`)
        self.t0 = time.perf_counter()
        for job in jobs:
            self.add(job)

    def add(self, job: Job) -> list[Row]:
        """`job`'s rows, appended to the batch (at its start, or joining it at a block start)."""
        self.jobs.append(job)
        primary = self.meter.models.get(self.meter.primary)
        new: list[Row] = []
        for p_i, prompt in enumerate(job.prompts):
            choices = [p_i * job.n + j for j in range(job.n)]
            groups = [[c] for c in choices] if job.sampled else [choices]
            new.extend(Row(job, prompt, g, self.decode) for g in groups)
        for row in new:
            row.nfe0 = primary.nfe if primary is not None else 0
        self.rows.extend(new)
        return new

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
        self.tokens_counted += row.tokens_generated
        primary = self.meter.models.get(self.meter.primary)
        # a shared canvas's rows are in every forward from their start on
        row.forwards = primary.nfe - row.nfe0 if primary is not None else 0
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


class Engine:
    """Queues jobs by batch key and decodes them on one worker thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 16, batch_window: float = 0.01,
                 max_queue: int = 256, dtype: str | None = None, batching: str = "auto", prompt_bucket: int = 32):
        check_batching(batching, prompt_bucket)
        if batching == "auto":
            batching = "step" if next(model.parameters()).device.type == "cuda" else "static"
        self.batching, self.prompt_bucket = batching, prompt_bucket
        self.stats = EngineStats()
        self.scheduler = Scheduler(self.stats, max_batch=max_batch, batch_window=batch_window, max_queue=max_queue)
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.device = next(model.parameters()).device
        self._thread: threading.Thread | None = None
        self._drafters: dict[tuple, Any] = {}
        self._batch: Batch | None = None  # the batch being decoded (read by /metrics)

    # -- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self.scheduler.open()
            self._thread = threading.Thread(target=self._worker, name="diffspec-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.scheduler.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- admission

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise a 429 ApiError (with Retry-After) when the queue is full."""
        self.scheduler.submit(job)

    def cancel(self, job: Job) -> None:
        """The client left or its request's timeout passed: the job's rows stop being decoded (they leave a
        running canvas at its next step or block start, see `BatchStreamer`), and a job still in the queue
        leaves it now, so its rows free the queue's capacity at once."""
        self.scheduler.cancel(job)

    def queue_depth(self) -> int:
        return self.scheduler.queue_depth()

    def flush(self) -> None:
        """Stop waiting for companions (draining: no new request will come): queued jobs start at once."""
        self.scheduler.flush()

    def running_rows(self) -> int:
        """Rows of the batch being decoded whose answers are not done yet (0 when the worker is idle)."""
        batch = self._batch
        return sum(1 for r in batch.rows if not r.done) if batch is not None else 0

    def abort_all(self, err: ApiError) -> int:
        """Fail every queued job and every unfinished job of the running batch with `err` (their rows are
        done from now on, so the running batch ends at its next step); the number of jobs failed."""
        return self.scheduler.abort(err)

    # the scheduler's settings, read by /health and /metrics (and set by tests)
    cond = property(lambda self: self.scheduler.cond)
    max_batch = property(lambda self: self.scheduler.max_batch)
    batch_window = property(lambda self: self.scheduler.batch_window,
                            lambda self, v: setattr(self.scheduler, "batch_window", v))
    max_queue = property(lambda self: self.scheduler.max_queue,
                         lambda self, v: setattr(self.scheduler, "max_queue", v))

    # -- the worker

    def _worker(self) -> None:
        while True:
            jobs = self.scheduler.take()
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
            self.scheduler.batch_done(dt)
            self.stats.batches_done += 1

    def run_jobs(self, jobs: list[Job]) -> None:
        """Decode `jobs` as one batch; if that fails, each job that has received nothing yet alone,
        so one bad request never fails its companions."""
        try:
            self._run_batch(jobs)
            return
        except Exception as e:
            # jobs that joined the batch while it ran share its fate
            jobs = jobs + [j for j in self.scheduler.running_jobs() if all(j is not k for k in jobs)]
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
                self._run_batch([job], join=False)  # a retry alone takes nobody in
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

    def _run_batch(self, jobs: list[Job], join: bool = True) -> None:
        now = time.monotonic()
        for job in jobs:
            job.started = job.started or now
        batch = Batch(jobs, self._decode, self.stats)
        self._batch = batch
        try:
            self._decode_batch(batch, jobs, join)
        finally:
            self._batch = None

    def _decode_batch(self, batch: Batch, jobs: list[Job], join: bool = True) -> None:
        """The one executor: the method's own decode function with a streamer, whatever the method."""
        from ..api import build_config

        self.stats.batches += 1
        self.stats.rows += len(batch.rows)
        self.stats.max_rows_in_batch = max(self.stats.max_rows_in_batch, len(batch.rows))
        m = get_method(batch.method)
        cfg = build_config(batch.method, batch.cfg, strict=False, batch_size=len(batch.rows))
        streamer = BatchStreamer(batch, self._free_row)
        if join and self.batching == "step" and not jobs[0].solo:
            key = jobs[0].key
            streamer.join = lambda room, capacity: self.scheduler.join(key, room, capacity)
            streamer.max_rows = self.max_batch
            streamer.max_total = JOIN_ROWS_PER_SLOT * self.max_batch
            longest = max(len(r.prompt.ids) for r in batch.rows)
            streamer.prompt_width = -(-longest // self.prompt_bucket) * self.prompt_bucket
        try:
            with torch.inference_mode():
                res = m.run(self.model, self.tokenizer, [r.prompt.text for r in batch.rows], cfg, progress=False,
                            streamer=streamer, meter=batch.meter, **self._models(m, cfg))
        finally:
            batch.meter.tokens_generated = batch.tokens_counted  # the streams' count, the one definition
            batch.count_forwards()
        self._free(batch.rows)
        for row, ids, text in zip(batch.rows, res.raw_ids or res.token_ids, res.texts):
            batch.feed(row, ids, True, text)
        for row in batch.rows:  # a method always finishes its rows; this is a safety net
            if not row.done:
                batch.feed(row, [], True)
        batch.count_forwards()
        for job in batch.jobs:  # those that joined it included
            if not job.done and not job.cancelled:
                job.done = True
                job.emit("done", batch.usage(job))

    def _models(self, method: Method, cfg: Any) -> dict[str, Any]:
        """The models `method`'s roles name beyond the target, loaded once (`Method.load`) and kept."""
        if method.load is None:
            return {}
        key = (method.name, *(str(getattr(cfg, r, None)) for r in method.roles if r != "model"))
        if key not in self._drafters:
            self._drafters[key] = method.load(cfg, self.model, self.tokenizer)
        return self._drafters[key]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _free_row(self, r: Row) -> bool:
        """Count row `r` as freed if it stops being decoded because its client left (or its request's
        timeout passed) before its answer was done; whether it was (once per row)."""
        if r.job.cancelled and not r.freed and not all(r.job.streams[c].finished for c in r.choices):
            r.freed = True
            self.stats.freed_rows += 1
            return True
        return False

    def _free(self, rows: list[Row]) -> int:
        """Count the rows among `rows` that stop being decoded because their client left; how many."""
        return sum(self._free_row(r) for r in rows)


class BatchStreamer(Streamer):
    """A batch's streamer: each row's final prefix to its choices' text streams (`Batch.feed`), the
    decode stopped once every row is done, and a done row let go when the loop can drop it."""

    def __init__(self, batch: Batch, free: Callable[[Row], bool]):
        self.batch, self.free = batch, free
        self.cells: list[dict[int, int]] = [{} for _ in batch.rows]
        self.final = [0] * len(batch.rows)  # each row's final prefix length so far
        self.length = gen_length_of(batch.cfg)
        # step-level batching (`Scheduler.join`, set by the engine): the queue's jobs that may join
        self.join: Callable[[int, int], list[Job]] | None = None
        self.max_rows = len(batch.rows)
        # A batch takes joiners until it has held this many rows in all, then drains: its bookkeeping
        # (rows, streams, cells) grows with every row it ever held, so a long-lived batch stays bounded.
        self.max_total = JOIN_ROWS_PER_SLOT * max(1, len(batch.rows))

    def admit(self, prompt_room: int, live_rows: int) -> list[tuple[int, list[int]]]:
        """Queued jobs of this batch's key join at the loop's block start, as many rows as fit."""
        if self.join is None or live_rows >= self.max_rows or len(self.batch.rows) >= self.max_total:
            return []
        out = []
        for job in self.join(prompt_room, self.max_rows - live_rows):
            for row in self.batch.add(job):
                out.append((len(self.cells), row.prompt.ids))
                self.cells.append({})
                self.final.append(0)
        if out and self.batch.stats is not None:
            stats = self.batch.stats
            stats.rows += len(out)
            stats.max_rows_in_batch = max(stats.max_rows_in_batch, live_rows + len(out))
        return out

    def on_commit(self, row: int, positions: Sequence[int], token_ids: Sequence[int]) -> None:
        cells = self.cells[row]
        cells.update(zip(positions, token_ids))
        n = self.final[row]
        while n in cells:
            n += 1
        if n > self.final[row]:
            self.final[row] = n
            r = self.batch.rows[row]
            if not r.done:
                self.batch.feed(r, [cells[i] for i in range(n)], n >= self.length)
        if self.batch.rows[row].done:  # a long-lived batch (step batching) keeps no finished row's cells
            cells.clear()

    def should_stop(self) -> bool:
        return all(r.done for r in self.batch.rows)

    def row_done(self, row: int) -> bool:
        """The loop asks only when it takes done rows out of its canvas: a freed row leaves it early."""
        r = self.batch.rows[row]
        if r.done and self.free(r) and self.batch.stats is not None:
            self.batch.stats.rows_left_early += 1
        return r.done
