"""train.stages: a recipe in several stages, each with its own schedule and budget, resumable."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffspec.train.common import TRAIN_KEYS, check_schema, stage_plan, train_loop
from diffspec.train.dflash import SCHEMA, WindowData


class Loss:
    """A loss that can stop the run after `stop_at` steps, like a session that ran out of time."""

    def __init__(self, model: torch.nn.Module, stop_at: int | None = None):
        self.model, self.calls, self.stop_at = model, 0, stop_at

    def __call__(self) -> torch.Tensor:
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.model(torch.ones(1, 2)).sum()


def run(tmp_path: Path, tr: dict, total: int, resume: bool = False, stop_at: int | None = None):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    loss = Loss(model, stop_at)
    stages: list[int] = []
    seen_lr: list[float] = []
    orig_step = torch.optim.AdamW.step

    def step(self, *a, **k):  # the LR each optimizer step used
        seen_lr.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        extra = train_loop("t", model, {"eval_every": 100, "save_every": 1, **tr}, total, tmp_path / "s.pt", resume,
                           torch.device("cpu"), loss, dict, lambda: None, on_stage=lambda i, s: stages.append(i))
    finally:
        torch.optim.AdamW.step = orig_step
    return extra, seen_lr, stages


def saved(tmp_path: Path) -> dict:
    return torch.load(tmp_path / "s.pt", map_location="cpu", weights_only=False)


def test_stages_run_in_turn_each_with_its_own_warm_restarted_schedule(tmp_path):
    tr = {"lr": 1e-2, "warmup": 2, "stages": [{"steps": 4}, {"steps": 4, "lr": 5e-3, "warmup": 2}]}
    extra, lrs, stages = run(tmp_path, tr, total=10)
    assert len(lrs) == 8 and stages == [0, 1]
    assert lrs[:3] == pytest.approx([5e-3, 1e-2, 1e-2])  # stage 0's warmup to its peak
    assert lrs[3] < 1e-2  # and its decay
    assert lrs[4:7] == pytest.approx([2.5e-3, 5e-3, 5e-3])  # stage 1 warms up again to its own peak
    assert lrs[7] < 5e-3
    st = saved(tmp_path)
    assert st["step"] == 8 and st["extra"]["stage"] == 1 and st["extra"]["stage_start"] == 4
    assert [h["stage"] for h in extra["history"]] == [0, 1]


def test_a_run_stopped_inside_a_stage_resumes_there_and_finishes_the_plan(tmp_path):
    tr = {"lr": 1e-2, "warmup": 1, "stages": [{"steps": 2}, {"steps": 3}]}
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tr, total=10, stop_at=4)  # stopped after stage 1's second step
    assert saved(tmp_path)["step"] == 4
    _, lrs, stages = run(tmp_path, tr, total=10, resume=True)
    assert len(lrs) == 1 and stages == [1]  # only the step that was left, in stage 1
    assert saved(tmp_path)["step"] == 5
    _, lrs, _ = run(tmp_path, tr, total=10, resume=True)
    assert lrs == []  # the plan is done: a further --resume trains nothing


def test_a_finished_single_stage_run_grows_a_second_stage_on_resume(tmp_path):
    """How a recipe grows across sessions: the first run spent its minutes; the config gains a stage."""
    run(tmp_path, {"lr": 1e-2, "warmup": 1}, total=5)
    st = saved(tmp_path)
    st["step"], st["extra"]["elapsed_seconds"] = 2, 3600.0  # as if its 1-minute budget ended at step 2
    torch.save(st, tmp_path / "s.pt")
    tr = {"lr": 1e-2, "warmup": 1, "stages": [{"max_minutes": 1}, {"steps": 3, "lr": 1e-3}]}
    _, lrs, stages = run(tmp_path, tr, total=5, resume=True)
    assert stages == [0, 1] and len(lrs) == 3  # stage 0 took no further step
    assert lrs[0] == pytest.approx(1e-3)
    assert saved(tmp_path)["step"] == 5


def test_resuming_with_fewer_stages_than_the_state_ran_is_a_clear_error(tmp_path):
    run(tmp_path, {"lr": 1e-2, "warmup": 1, "stages": [{"steps": 2}, {"steps": 2}]}, total=10)
    with pytest.raises(ValueError, match="saved in stage 2 of train.stages, but the config now has 1"):
        run(tmp_path, {"lr": 1e-2, "warmup": 1}, total=10, resume=True)


def test_stage_plan_inherits_what_a_stage_does_not_set():
    plan = stage_plan({"lr": 1e-3, "warmup": 7, "max_minutes": 5, "stages": [{}, {"lr": 2e-4, "steps": 9}]}, 40)
    assert plan[0] == {"steps": 40, "lr": 1e-3, "warmup": 7, "max_minutes": 5.0}
    assert plan[1] == {"steps": 9, "lr": 2e-4, "warmup": 7, "max_minutes": 5.0}
    assert stage_plan({"lr": 1e-3}, 12) == [{"steps": 12, "lr": 1e-3, "warmup": 100, "max_minutes": 0.0}]


@pytest.mark.parametrize("stages, match", [
    ([], "non-empty list"),
    ({"steps": 3}, "non-empty list"),
    ([{"stpes": 3}], r"train.stages\[0\].stpes"),
    ([{"steps": 0}], r"train.stages\[0\].steps must be an integer >= 1"),
    ([{"batch_size": 4}], "unknown key"),  # a stage changes the schedule, not the batch
    ([{"train_pool": 4}], "unknown key"),  # only the drafter trainer reads train_pool
])
def test_bad_stages_are_refused_with_the_key_named(stages, match):
    with pytest.raises(ValueError, match=match):
        check_schema({"stages": stages}, TRAIN_KEYS, "train")


def test_the_drafter_trainer_takes_a_train_pool_per_stage():
    check_schema({"stages": [{"train_pool": 3}, {"train_pool": 7, "steps": 2}]}, SCHEMA["train"], "train")
    with pytest.raises(ValueError, match=r"train_pool must be an integer >= 1"):
        check_schema({"stages": [{"train_pool": 0}]}, SCHEMA["train"], "train")


def test_window_data_draws_only_from_the_stage_pool():
    seqs = [([1, 2], [3, 4, 5]), ([1], [6]), ([1, 2], [7, 8, 9]), ([1], [10, 11, 12])]  # the second is too short
    hidden = [torch.zeros(len(p) + len(a), 4) for p, a in seqs]
    data = WindowData(seqs, hidden, "dflash", 4, 4, 0, seed=0)
    data.use_first(3)  # the first three given: two usable
    for _ in range(20):
        b = data.sample(4, 2, torch.device("cpu"))
        assert b["ctx_hidden"].shape[0] <= 2
        assert set(b["labels"][b["labels"] >= 0].tolist()) <= {4, 5, 8, 9}
    data.use_first(4)
    seen = set()
    for _ in range(20):
        b = data.sample(4, 2, torch.device("cpu"))
        seen |= set(b["labels"][b["labels"] >= 0].tolist())
    assert seen & {11, 12}
    with pytest.raises(ValueError, match="none of the first 1"):
        WindowData(seqs[1:], hidden[1:], "dflash", 4, 4, 0, seed=0).use_first(1)
