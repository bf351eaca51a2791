"""One hook through which every decoding loop reports the tokens it has made final.

In the spirit of transformers' `BaseStreamer`: a loop calls `on_commit(row, positions,
token_ids)` when cells of a row's answer become final (never to change again) and asks
`should_stop()` between steps; a streamer that says stop ends the loop early (its result is
then partial, and only the streamer's view of it counts). Rows are indices into the prompts
given to the method, positions are offsets into the answer (0 = the first generated token).

Without a streamer (None, the default everywhere) no loop does any extra work, so what a
method decodes cannot depend on the hook. A server passes one to stream text as it becomes
final (`serve.engine`); `row_done` lets a loop that can take a row out of its batch without
changing the others' results (the block decoder, see `decoding.diffusion`) do so.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .state import Canvas


class Streamer:
    """The hook's protocol; this base class hears everything and never stops a loop."""

    # Step-level batching: the prompt columns a canvas reserves, so that prompts up to this long
    # can join it later (`admit`); 0 = just the batch's longest prompt.
    prompt_width: int = 0

    def on_commit(self, row: int, positions: Sequence[int], token_ids: Sequence[int]) -> None:
        """Cells `positions` of row `row`'s answer are final, holding `token_ids`."""

    def on_draft(self, row: int, confidences: Sequence[float]) -> None:
        """A speculative round of row `row` drafted tokens with these drafter probabilities (before
        verification; DFlash and D²SD report them: `speculative.sizing` reads them)."""

    def should_stop(self) -> bool:
        """Whether the loop may end now (every row's answer is done for whoever listens)."""
        return False

    def row_done(self, row: int) -> bool:
        """Whether nobody needs more of row `row` (a loop may then stop computing it)."""
        return False

    def admit(self, prompt_room: int, live_rows: int) -> list[tuple[int, list[int]]]:
        """Step-level batching: new rows to add to the running batch now, as (row, prompt ids).

        A loop that can take rows in without changing the others' results (the block decoder, at
        a block start) asks; `prompt_room` is the longest prompt that fits its canvas and
        `live_rows` how many rows it decodes. The streamer numbers the new rows after every row it
        knows. Default: none."""
        return []


class OffsetStreamer(Streamer):
    """`streamer` seen by a loop that decodes the prompts from `offset` on (one batch of many)."""

    def __init__(self, streamer: Streamer, offset: int):
        self.streamer, self.offset = streamer, offset

    def on_commit(self, row: int, positions: Sequence[int], token_ids: Sequence[int]) -> None:
        self.streamer.on_commit(self.offset + row, positions, token_ids)

    def on_draft(self, row: int, confidences: Sequence[float]) -> None:
        self.streamer.on_draft(self.offset + row, confidences)

    def should_stop(self) -> bool:
        return self.streamer.should_stop()

    def row_done(self, row: int) -> bool:
        return self.streamer.row_done(self.offset + row)

    def admit(self, prompt_room: int, live_rows: int) -> list[tuple[int, list[int]]]:
        return [(row - self.offset, ids) for row, ids in self.streamer.admit(prompt_room, live_rows)]

    @property
    def prompt_width(self) -> int:  # type: ignore[override]
        return self.streamer.prompt_width


def commit_tail(streamer: Streamer | None, row: int, out: Sequence[int], n: int) -> bool:
    """An AR loop appended `n` final tokens to row `row`'s answer `out`: report them; whether
    the loop may stop now. (None: no streamer, nothing to do.)"""
    if streamer is None or n <= 0:
        return False
    start = len(out) - n
    streamer.on_commit(row, list(range(start, len(out))), list(out[start:]))
    return streamer.should_stop()


class RowReporter:
    """Reports the cells of one row's answer that hold a token and were not reported yet, for loops
    that decode one prompt at a time (`decoding.llada2`); `tick(gen)` takes the answer's cells."""

    def __init__(self, streamer: Streamer, row: int, mask_id: int):
        self.streamer, self.row, self.mask_id = streamer, row, mask_id
        self.reported: torch.Tensor | None = None

    def tick(self, gen: torch.Tensor) -> bool:
        """Report what became final in `gen`; whether the loop may stop now."""
        if self.reported is None:
            self.reported = torch.zeros_like(gen, dtype=torch.bool)
        new = (gen != self.mask_id) & ~self.reported
        if bool(new.any()):
            self.reported |= new
            positions = new.nonzero()[:, 0]
            self.streamer.on_commit(self.row, positions.tolist(), gen[positions].tolist())
        return self.streamer.should_stop()


class CanvasReporter:
    """Reports the cells of a canvas's answer region that hold a token and were not reported yet.

    A masked-diffusion loop calls it wherever every unmasked cell is final (after each step for
    loops that never take a committed cell back). `rows[i]` is canvas row i's row for the
    streamer; `keep` follows the loop when it takes rows out of its canvas."""

    def __init__(self, streamer: Streamer, canvas: Canvas, rows: Sequence[int] | None = None):
        self.streamer, self.canvas = streamer, canvas
        self.rows = list(range(canvas.batch_size)) if rows is None else list(rows)
        self.reported = torch.zeros(canvas.batch_size, canvas.gen_length, dtype=torch.bool, device=canvas.x.device)

    def __call__(self) -> None:
        c = self.canvas
        gen = c.x[:, c.prompt_len : c.prompt_len + c.gen_length]
        new = (gen != c.mask_id) & ~self.reported
        if not bool(new.any()):
            return
        self.reported |= new
        for i in new.any(1).nonzero()[:, 0].tolist():
            positions = new[i].nonzero()[:, 0]
            self.streamer.on_commit(self.rows[i], positions.tolist(), gen[i, positions].tolist())

    def tick(self) -> bool:
        """Report what became final; whether the loop may stop now."""
        self()
        return self.streamer.should_stop()

    def keep(self, idx: list[int], canvas: Canvas) -> None:
        """The loop now decodes only rows `idx` of the old canvas, in `canvas`."""
        self.canvas = canvas
        self.rows = [self.rows[i] for i in idx]
        self.reported = self.reported[idx]

    def add(self, rows: list[int], canvas: Canvas) -> None:
        """Rows joined the loop's canvas (now `canvas`, the new rows last) as the streamer's `rows`."""
        self.canvas = canvas
        self.rows += rows
        self.reported = torch.cat([self.reported, self.reported.new_zeros(len(rows), canvas.gen_length)])
