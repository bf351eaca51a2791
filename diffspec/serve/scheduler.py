"""The server's scheduler: admission, batch keys and the queues (issue #36: scheduler, executor and
output processing apart).

Requests whose decoding settings agree (`batch_key`: the method and its whole config but the batch
size, and the seed when nothing is sampled) wait in one queue; `take` hands the executor
(`serve.engine.Engine`) the oldest queue once its first job has waited the collection window (or
the queue holds a full batch), up to `max_batch` rows. Requests with other settings wait in their
own queues. A request that samples (temperature > 0, random remasking, Dream's sampler) is decoded
alone, so its seed reproduces `diffspec.api.generate`, and so is a request whose method does not
batch (`Method.batches`). With step-level batching, `join` lets queued jobs into a running batch.
A full queue answers 429 with Retry-After; a cancelled job leaves its queue at once.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..methods import get_method
from .errors import ApiError, queue_full
from .text import TextStream

# A method batches (`Method.batches`) when its rows decode in one canvas exactly as each would
# alone (checked against `generate` one prompt at a time) and share their forwards. Every other
# method decodes each request alone: DualDiffusion's rows advance in lockstep (one iteration budget
# and drafter clock per canvas), so a companion changes a row's answer; ar-spec, dflash and d2sd
# decode rows one at a time anyway, so a batch would only delay its first answers.


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


def gen_length_of(cfg: Any) -> int:
    return int(cfg.gen_length)


# `Engine(batching=...)`, `diffspec serve --batching`. "auto" is step on CUDA and static on a CPU: a
# CPU forward of B rows costs B times one row's (benchmarks/serve-step-cpu/forward_cost.py), so a row
# that joins slows every step of its batch by its share and, with mixed traffic, static batching
# served 1.3x the requests (benchmarks/serve-soak-step-cpu).
BATCHING = ("auto", "step", "static")

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
    joined: int = 0  # jobs that joined a running batch at a block start (step-level batching)
    freed_rows: int = 0  # canvas rows that stopped being decoded early because their client left
    rows_left_early: int = 0  # freed rows taken out of a running canvas while its other rows went on decoding
    max_rows_in_batch: int = 0
    tokens_generated: int = 0  # each decoded row's answer through its first EOS or stop string (see above)
    busy_seconds: float = 0.0
    started: float = field(default_factory=time.time)


class Scheduler:
    """The queues by batch key, their admission and the choice of the next batch (thread-safe)."""

    def __init__(self, stats: EngineStats, *, max_batch: int, batch_window: float, max_queue: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not batch_window >= 0:
            raise ValueError(f"batch_window must be >= 0 seconds, got {batch_window}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.stats = stats
        self.max_batch, self.batch_window, self.max_queue = max_batch, batch_window, max_queue
        self.cond = threading.Condition()
        self.queues: dict[str, deque[Job]] = {}
        self.queued_rows = 0
        self._batch_seconds = 0.5  # running estimate, for Retry-After
        self._stop = False
        self._current: list[Job] = []  # the jobs of the batch being decoded (failed by `abort`)

    def open(self) -> None:
        with self.cond:
            self._stop = False

    def close(self) -> None:
        """Stop: `take` returns None from now on, and every queued job fails with 503."""
        with self.cond:
            self._stop = True
            pending = [j for q in self.queues.values() for j in q]
            self.queues.clear()
            self.queued_rows = 0
            self.cond.notify_all()
        for job in pending:
            job.fail(ApiError(503, "the server is shutting down", "server_error", None, "shutting_down"))

    def batch_done(self, seconds: float) -> None:
        """The batch `take` gave out ended after `seconds` (its jobs are no longer running)."""
        with self.cond:
            self._current = []
        self._batch_seconds = 0.7 * self._batch_seconds + 0.3 * seconds

    def running_jobs(self) -> list[Job]:
        with self.cond:
            return list(self._current)

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
        running canvas at its next step or block start, see `BatchStreamer`), and a job still in the queue
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

    def abort(self, err: ApiError) -> int:
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

    def take(self) -> list[Job] | None:
        """Wait for the next batch: the oldest queue, once its head waited the window or it fills a batch."""
        with self.cond:
            while True:
                if self._stop:
                    return None
                for key in list(self.queues):
                    if not self._pop_cancelled(self.queues[key]):
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

    def _pop_cancelled(self, q: deque[Job]) -> bool:
        """Drop the cancelled jobs at the head of `q` (under `cond`); whether a job is left."""
        while q and q[0].cancelled:
            self.queued_rows -= q.popleft().n_rows
            self.stats.cancelled += 1
        return bool(q)

    def join(self, key: str, prompt_room: int, capacity: int) -> list[Job]:
        """Step-level batching: queued jobs of `key` that join its running batch now, oldest first, while their
        rows fit `capacity` and their prompts `prompt_room` tokens (the first that does not fit waits
        for the next batch, and so does everything behind it: arrival order is kept). A job that
        arrived after the oldest job waiting under another key does not join: the running batch then
        ends as its rows finish, and the other key's batch starts, so no key starves another."""
        taken: list[Job] = []
        with self.cond:
            q = self.queues.get(key)
            others = [d[0].created for k, d in self.queues.items() if k != key and d]
            oldest_other = min(others) if others else float("inf")
            while q and self._pop_cancelled(q):
                job = q[0]
                if job.n_rows > capacity or any(len(p.ids) > prompt_room for p in job.prompts) \
                        or job.created > oldest_other:
                    break
                q.popleft()
                self.queued_rows -= job.n_rows
                capacity -= job.n_rows
                taken.append(job)
            if q is not None and not q:
                del self.queues[key]
            self._current.extend(taken)
            if taken:
                self.cond.notify_all()
        now = time.monotonic()
        for job in taken:
            job.started = now
            self.stats.joined += 1
        return taken
