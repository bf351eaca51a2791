"""Step-level batching (issue #38): rows join a running block-decoding batch at a block start.

The decoder level: rows added to a running canvas (`BlockDecoder.add_rows`, through a streamer's
`admit`) decode exactly what each decodes alone, for every cache the server lets rows join, while
sharing the batch's forwards. The engine level: a request that arrives while a compatible batch is
decoding joins it (`Engine(batching="step")`) and its answer is still `generate`'s; with
`batching="static"` it waits for its own batch. Nothing here depends on the machine's speed: the
late request is submitted from the first request's own event stream, on the worker thread.
"""
from __future__ import annotations

import threading

import pytest
import torch

from diffspec.api import build_config, generate
from diffspec.decoding.config import DecodeConfig
from diffspec.decoding.diffusion import BlockDecoder, decode_canvas
from diffspec.decoding.meter import CostMeter, MeteredModel
from diffspec.decoding.state import Canvas
from diffspec.decoding.streamer import Streamer
from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, load_model
from diffspec.tasks import load_examples

QUESTIONS = [e.prompt for e in load_examples("arith", limit=6)]


@pytest.fixture(scope="module")
def model():
    m, tok = load_model(DEFAULT_MODEL_DIR)
    return m.eval(), tok


@pytest.fixture(scope="module")
def ar_model():
    from diffspec.models.causal import load_causal

    return load_causal(DEFAULT_MODEL_DIR.parent / "qwen3-arith")


class LateRows(Streamer):
    """Starts with rows 0..n-1; admits `pending` prompts at the `at`-th block start the loop reaches."""

    def __init__(self, n: int, pending: list[list[int]], at: int):
        self.n, self.pending, self.at = n, pending, at
        self.starts = 0
        self.cells: dict[int, dict[int, int]] = {}
        self.rooms: list[int] = []

    def admit(self, prompt_room: int, live_rows: int) -> list[tuple[int, list[int]]]:
        self.starts += 1
        self.rooms.append(prompt_room)
        if self.starts != self.at or not self.pending:
            return []
        new = [(self.n + i, p) for i, p in enumerate(self.pending)]
        self.pending = []
        return new

    def on_commit(self, row, positions, token_ids) -> None:
        self.cells.setdefault(row, {}).update(zip(positions, token_ids))

    def answer(self, row: int, length: int) -> list[int]:
        return [self.cells[row][i] for i in range(length)]


def alone(model, ids: list[int], cfg: DecodeConfig) -> tuple[list[int], int]:
    m, _ = model
    mc = m.config
    c = Canvas.from_prompts([ids], cfg.gen_length, mc.mask_token_id, mc.pad_token_id, mc.max_sequence_length)
    meter = CostMeter()
    with torch.inference_mode():
        decode_canvas(MeteredModel(m, meter), c, cfg, None)
    return c.generated()[0].tolist(), meter.nfe


@pytest.mark.parametrize("cache,policy", [("none", "schedule"), ("prefix", "threshold"), ("dual", "threshold"),
                                          ("dual", "schedule"), ("dkv-decode", "schedule"),
                                          ("dkv-prefill", "schedule")])
def test_rows_that_join_at_a_block_start_decode_as_alone_and_share_forwards(model, cache, policy):
    m, tok = model
    mc = m.config
    cfg = DecodeConfig(gen_length=64, block_length=16, steps=32, cache=cache, policy=policy, threshold=0.9)
    ids = [tok.encode(q) for q in QUESTIONS[:4]]
    want = [alone(model, p, cfg) for p in ids]
    canvas = Canvas.from_prompts(ids[:2], 64, mc.mask_token_id, mc.pad_token_id, mc.max_sequence_length,
                                 min_prompt_len=max(map(len, ids)))
    streamer = LateRows(2, ids[2:], at=3)  # rows 2 and 3 join where the first two begin their third block
    meter = CostMeter()
    with torch.inference_mode():
        decode_canvas(MeteredModel(m, meter), canvas, cfg, None, streamer)
    assert streamer.starts >= 3 and not streamer.pending  # they did join, two blocks late
    for row in range(4):
        assert streamer.answer(row, 64) == want[row][0], row
    assert canvas.generated().tolist() == [want[0][0], want[1][0]]  # the first rows' canvas is filled as before
    # one shared forward per step: fewer than the first pair's forwards plus the late pair's
    first_pair = max(want[0][1], want[1][1])
    assert meter.nfe < first_pair + max(want[2][1], want[3][1])


def test_a_joining_row_starts_at_its_own_first_block(model):
    """The offset is what makes a late row decode its first block while its companions decode their
    third: without it the late row would start at block 2 and leave blocks 0-1 masked."""
    m, tok = model
    mc = m.config
    cfg = DecodeConfig(gen_length=64, block_length=16, steps=32)
    ids = [tok.encode(q) for q in QUESTIONS[:2]]
    canvas = Canvas.from_prompts(ids[:1], 64, mc.mask_token_id, mc.pad_token_id, mc.max_sequence_length,
                                 min_prompt_len=max(map(len, ids)))
    dec = BlockDecoder(MeteredModel(m, CostMeter()), canvas, cfg, None)
    with torch.inference_mode():
        for _ in range(16):  # blocks 0 and 1 of row 0 (8 steps each)
            dec.step()
        assert dec.at_round_start() and dec.current_block() == 2
        late = Canvas.from_prompts(ids[1:], 64, mc.mask_token_id, mc.pad_token_id, mc.max_sequence_length,
                                   min_prompt_len=canvas.prompt_len)
        dec.add_rows(late)
        out = dec.step()
    assert dec.offset.tolist() == [0, 2]
    P = canvas.prompt_len
    assert out.block.starts.tolist() == [P + 32, P]
    assert out.chosen[1].any() and out.s == -1  # the rows' blocks differ
    with pytest.raises(RuntimeError, match="only where a round"):
        dec.add_rows(late)


def test_a_join_is_refused_where_it_would_change_the_answers(model):
    m, tok = model
    mc = m.config
    cfg = DecodeConfig(gen_length=32, block_length=16, steps=16)
    short, longer = sorted((tok.encode(q) for q in QUESTIONS[:3]), key=len)[::2]
    canvas = Canvas.from_prompts([short], 32, mc.mask_token_id, mc.pad_token_id, mc.max_sequence_length)
    dec = BlockDecoder(MeteredModel(m, CostMeter()), canvas, cfg, None)
    with pytest.raises(ValueError, match="layout"):  # a longer prompt does not fit the canvas's prompt columns
        dec.add_rows(Canvas.from_prompts([longer], 32, mc.mask_token_id, mc.pad_token_id, 512))
    streamer = LateRows(1, [longer], at=1)
    with pytest.raises(ValueError, match="longer than the canvas"):
        with torch.inference_mode():
            decode_canvas(MeteredModel(m, CostMeter()), canvas, cfg, None, streamer)


def test_ar_rows_join_after_any_forward_and_decode_as_alone(ar_model):
    """AR step-level batching (`speculative.ar._ARRows`): two rows join after the 4th forward and one
    after the 11th (when the first rows may be done and leave); every row's answer is its answer
    alone, and the first rows' results are still returned."""
    from diffspec.decoding.runner import eos_ids
    from diffspec.speculative.ar import ARConfig, ar_batch

    m, tok = ar_model
    ids = [tok.encode(q) for q in QUESTIONS[:5]]
    cfg, eos, gen = ARConfig(gen_length=48), frozenset(eos_ids(m)), torch.Generator()

    def run(rows, streamer=None):
        meter = CostMeter()
        with torch.inference_mode():
            return ar_batch(MeteredModel(m, meter), rows, cfg, eos, gen, streamer=streamer), meter

    want = [run([p])[0][0] for p in ids]

    class Late(LateRows):
        def admit(self, prompt_room, live_rows):
            self.starts += 1
            self.rooms.append(prompt_room)
            return {4: [(2, ids[2]), (3, ids[3])], 11: [(4, ids[4])]}.get(self.starts, [])

    streamer = Late(2, [], 0)
    out, meter = run(ids[:2], streamer)
    assert out == want[:2]
    for row in range(5):
        assert [streamer.cells[row][i] for i in range(len(want[row]))] == want[row], row
    assert streamer.rooms[3] == max(map(len, ids[:2])) + 4  # a prompt fits left of the current column
    assert meter.nfe < sum(run([p])[1].nfe for p in ids)  # the rows shared their forwards


# ---------------------------------------------------------------- the engine


def run_two(model, batching: str, method: str = "vanilla", other: dict | None = None,
            **opts) -> tuple[list[str], object, list[dict]]:
    """Request A starts alone; request B is submitted when A's first text arrives (A decoding); with
    `other`, a request with those other options is submitted just before B."""
    from diffspec.serve.engine import Engine
    from diffspec.serve.scheduler import Job, Prompt

    m, tok = model
    eng = Engine(m, tok, max_batch=4, batch_window=0.0, batching=batching)
    cfg = build_config(method, **opts)
    from diffspec.decoding.runner import eos_ids

    eos = tuple(eos_ids(m))
    a_q, b_q = QUESTIONS[0], QUESTIONS[1]
    # the other request is made (arrives) before B, which is what `created` records
    first = [Job(method, build_config(method, **other), [Prompt(a_q, tok.encode(a_q))], 1, [], eos, None)] \
        if other is not None else []
    jobs = [Job(method, cfg, [Prompt(q, tok.encode(q))], 1, [], eos, None) for q in (a_q, b_q)] + first
    events: dict[int, list] = {i: [] for i in range(len(jobs))}
    done = threading.Event()

    def sink(i: int):
        def take(ev: tuple) -> None:
            events[i].append(ev)
            if i == 0 and ev[0] == "delta" and not any(e[0] == "delta" for e in events[0][:-1]):
                for job in jobs[2:] + jobs[1:2]:
                    eng.submit(job)
            if all(evs and evs[-1][0] in ("done", "error") for evs in events.values()):
                done.set()
        return take

    for i, job in enumerate(jobs):
        job.sink = sink(i)
    eng.start()
    try:
        eng.submit(jobs[0])
        done.wait()
    finally:
        eng.stop()
    texts = ["".join(e[2] for e in events[i] if e[0] == "delta") for i in range(len(jobs))]
    assert all(events[i][-1][0] == "done" for i in range(len(jobs))), events
    return texts, eng.stats, [events[i][-1][1] for i in range(len(jobs))]


@pytest.mark.parametrize("method,opts", [
    ("vanilla", dict(gen_length=64, block_length=16, steps=32)),
    ("fast-dllm", dict(gen_length=64, block_length=16, cache="dual")),
    ("dkv-cache", dict(gen_length=64, block_length=16, steps=32)),
])
def test_a_request_arriving_mid_batch_joins_it_and_answers_as_alone(model, method, opts):
    m, tok = model
    texts, stats, usages = run_two(model, "step", method, **opts)
    assert stats.joined == 1 and stats.batches == 1 and stats.max_rows_in_batch == 2
    for q, text in zip(QUESTIONS[:2], texts):
        assert text == generate([q], model=m, tokenizer=tok, method=method, **opts).texts[0]
    b = usages[1]["diffspec"]
    # B's TPF counts only the shared forwards since it joined, fewer than the batch's by then
    b_forwards = b["tokens_generated"] / b["tokens_per_forward"]
    assert b_forwards == pytest.approx(round(b_forwards)) and 0 < round(b_forwards) < b["forwards"]


def test_an_ar_request_arriving_mid_batch_joins_it_and_answers_as_alone(ar_model):
    m, tok = ar_model
    texts, stats, _ = run_two(ar_model, "step", "ar", max_new_tokens=48)
    assert stats.joined == 1 and stats.batches == 1
    for q, text in zip(QUESTIONS[:2], texts):
        assert text == generate([q], model=m, tokenizer=tok, method="ar", max_new_tokens=48).texts[0]


def test_static_batching_keeps_a_late_request_for_its_own_batch(model):
    m, tok = model
    opts = dict(gen_length=64, block_length=16, steps=32)
    texts, stats, _ = run_two(model, "static", **opts)
    assert stats.joined == 0 and stats.batches == 2 and stats.max_rows_in_batch == 1
    assert texts[1] == generate([QUESTIONS[1]], model=m, tokenizer=tok, method="vanilla", **opts).texts[0]


def test_a_request_does_not_join_ahead_of_an_older_one_with_other_settings(model):
    """No starvation: B may not join A's batch while C (other settings, queued before B) waits; A's
    batch ends, then C's and B's run, and every answer is still its own."""
    m, tok = model
    opts = dict(gen_length=64, block_length=16, steps=32)
    texts, stats, _ = run_two(model, "step", other=dict(gen_length=32, block_length=16, steps=16), **opts)
    assert stats.joined == 0 and stats.batches == 3
    assert texts[1] == generate([QUESTIONS[1]], model=m, tokenizer=tok, method="vanilla", **opts).texts[0]


def test_engine_batching_options_are_checked(model):
    from diffspec.serve.engine import Engine

    m, tok = model
    with pytest.raises(ValueError, match="batching must be one of auto, step, static"):
        Engine(m, tok, batching="continuous")
    assert Engine(m, tok).batching == "static"  # auto, on a CPU: see benchmarks/serve-soak-step-cpu
    with pytest.raises(ValueError, match="prompt_bucket must be an integer >= 1"):
        Engine(m, tok, prompt_bucket=0)


def test_a_long_lived_ar_batch_keeps_its_cache_as_wide_as_its_live_rows(ar_model, monkeypatch):
    """200 prompts join one after another (never more than 4 live): done rows and the columns no live
    row reads leave the cache, so its width stays bounded instead of growing one column a forward."""
    from diffspec.decoding.runner import eos_ids
    from diffspec.models.causal import CausalKVCache
    from diffspec.speculative.ar import ARConfig, ar_batch

    m, tok = ar_model
    p = tok.encode(QUESTIONS[0])
    widths: list[int] = []
    grow = CausalKVCache.grow
    monkeypatch.setattr(CausalKVCache, "grow", lambda self, rows, n: (grow(self, rows, n), widths.append(self.max_len)))

    class Always(Streamer):
        def __init__(self):
            self.n = 0

        def admit(self, prompt_room, live_rows):
            if live_rows >= 4 or self.n >= 200:
                return []
            self.n += 1
            return [(self.n, p)]

    streamer = Always()
    with torch.inference_mode():
        ar_batch(MeteredModel(m, CostMeter()), [p], ARConfig(gen_length=8), frozenset(eos_ids(m)), torch.Generator(),
                 streamer=streamer)
    assert streamer.n == 200 and max(widths) <= len(p) + 2 * 8


def test_a_batch_stops_taking_joiners_after_its_quota_of_rows(model):
    """The streamer's cap: a step batch that has held 8 × max_batch rows admits nobody, so its bookkeeping
    stays bounded however long the traffic lasts; below the cap it admits."""
    from diffspec.serve.engine import Batch, BatchStreamer
    from diffspec.serve.scheduler import Job, Prompt

    m, tok = model
    cfg = build_config("vanilla", gen_length=32, block_length=16, steps=16)
    job = lambda: Job("vanilla", cfg, [Prompt(QUESTIONS[0], tok.encode(QUESTIONS[0]))], 1, [], (0,), None)  # noqa: E731
    batch = Batch([job()], tok.decode)
    streamer = BatchStreamer(batch, lambda r: False)
    streamer.join, streamer.max_rows, streamer.max_total = (lambda room, capacity: [job()]), 4, 3
    assert len(streamer.admit(512, 1)) == 1 and len(streamer.admit(512, 1)) == 1  # 3 rows held now
    assert streamer.admit(512, 1) == [] and len(batch.rows) == 3
