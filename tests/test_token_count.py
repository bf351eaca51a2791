"""One meaning of "tokens generated" for every method: each answer through its first EOS.

A masked diffusion model fills its whole canvas, the EOS padding after the
answer included; an AR model stops at EOS. Counting the padding would inflate
a diffusion method's tokens per forward against an AR method's, so the meter
counts the same thing for both (`answer_length`).
"""
from __future__ import annotations

import pytest

from diffspec.api import generate, load_any
from diffspec.bench.table import format_table
from diffspec.decoding.meter import answer_length
from diffspec.speculative.armethods import DEFAULT_TARGET
from diffspec.tasks import load_examples


def test_answer_length_counts_through_the_first_eos():
    assert answer_length([5, 6, 0, 0, 7], {0}) == 3
    assert answer_length([0, 0], {0}) == 1
    assert answer_length([5, 6, 7], {0}) == 3
    assert answer_length([5, 9, 6], {0, 9}) == 2
    assert answer_length([], {0}) == 0


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [e.prompt for e in load_examples("arith", limit=3)]


@pytest.mark.parametrize("method, options", [("vanilla", {}), ("fast-dllm", {"cache": "dual", "policy": "threshold"})])
def test_diffusion_methods_do_not_count_the_eos_padding(prompts, method, options):
    res = generate(prompts, method=method, **options)  # the bundled LLaDA model
    gen_length = res.config.gen_length
    eos_id = load_any(None)[0].config.eos_token_id
    padded = [row for row in res.raw_ids if row.count(eos_id) > 1]
    assert padded, "the bundled model's short answers leave EOS padding on the canvas"
    expected = sum(len(ids) + 1 if len(ids) < gen_length else len(ids) for ids in res.token_ids)
    assert res.meter.tokens_generated == expected
    assert res.meter.tokens_generated < len(prompts) * gen_length


def test_ar_counts_the_same_way(prompts):
    res = generate(prompts, model=DEFAULT_TARGET, method="ar")
    # every answer of the bundled target ends with an EOS: its tokens plus that EOS
    assert res.meter.tokens_generated == sum(len(ids) + 1 for ids in res.token_ids)
    assert res.meter.tokens_per_forward == pytest.approx(1.0)


def test_table_names_both_tokens_per_forward():
    one = {"label": "vanilla", "tokens_per_forward": 2.0, "tokens_per_forward_all": 2.0, "primary": "model",
           "models": {"model": {"flops": 1e9}}}
    two = {"label": "dual", "tokens_per_forward": 6.0, "tokens_per_forward_all": 2.5, "primary": "verifier",
           "models": {"verifier": {"flops": 1e9}, "drafter": {"flops": 2e9}}}
    narrow = format_table([one])
    assert "TPF (target)" in narrow and "TPF (all models)" not in narrow
    wide = format_table([one, two])
    head, _, r1, r2 = wide.splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    i, j = cols.index("TPF (target)"), cols.index("TPF (all models)")
    assert j == i + 1
    cells = [c.strip() for c in r2.strip("|").split("|")]
    assert (cells[i], cells[j]) == ("6.00", "2.50")
    assert [c.strip() for c in r1.strip("|").split("|")][j] == "2.00"


def test_table_shows_target_forwards_and_flexible_accuracy_only_when_they_say_something():
    ar = {"label": "ar", "task": "gsm8k", "accuracy": 0.0, "accuracy_flexible": 0.25, "nfe_per_sequence": 150.0,
          "sequences": 4,
          "primary": "target", "models": {"target": {"flops": 1e9, "sequence_forwards": 600}}}
    spec = {"label": "ar-spec", "task": "gsm8k", "accuracy": 0.0, "accuracy_flexible": 0.25, "nfe_per_sequence": 400.0,
            "sequences": 4,
            "primary": "target", "models": {"target": {"flops": 2e9, "sequence_forwards": 340},
                                            "drafter": {"flops": 1e8, "sequence_forwards": 1260}}}
    narrow = format_table([{k: v for k, v in ar.items() if k != "accuracy_flexible"}])
    assert "target fwd/seq" not in narrow and "flexible" not in narrow
    head, _, r1, r2 = format_table([ar, spec]).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols.index("target fwd/seq") == cols.index("fwd/seq") + 1
    assert cols.index("accuracy (flexible)") == cols.index("accuracy") + 1
    cell = lambda row, name: [c.strip() for c in row.strip("|").split("|")][cols.index(name)]  # noqa: E731
    assert (cell(r1, "target fwd/seq"), cell(r2, "target fwd/seq")) == ("150.0", "85.0")
    assert (cell(r2, "fwd/seq"), cell(r2, "accuracy (flexible)")) == ("400.0", "25.0%")


@pytest.mark.parametrize("task,shown", [("gsm8k", True), ("arith", False), ("arith-hard", False), (None, False)])
def test_flexible_accuracy_is_shown_for_gsm8k_rows_only(task, shown):
    """Scoring gives every numeric task an `accuracy_flexible`; the table's column and the plot's key
    show it only for GSM8K rows (evaluation.flexible.FLEXIBLE_TASKS), where strict "#### N" misses prose answers."""
    from diffspec.bench.plot import _key_label

    row = {"label": "vanilla", "accuracy": 0.9, "accuracy_flexible": 0.95, "nfe_per_sequence": 48.0,
           **({"task": task} if task else {})}
    head = format_table([row]).splitlines()[0]
    assert ("accuracy (flexible)" in head) == shown
    assert ("flexible 95.0%" in _key_label(1, row)) == shown
