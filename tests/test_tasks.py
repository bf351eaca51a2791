"""Tasks: the arith generator, lm-eval style prompts and answer scoring."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from diffspec.tasks import (
    GSM8K_STOPS,
    LETTERS,
    TASKS,
    Example,
    arith_examples,
    gsm8k_prompt,
    load_examples,
    score,
)
from diffspec.tasks import arith
from diffspec.tasks.scoring import (
    extract_flexible,
    extract_strict,
    normalize_number,
    reference_answer,
    truncate_at_stops,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"
MMLU_TEST = DATA / "mmlu" / "test.jsonl"
needs_gsm8k = pytest.mark.skipif(not (GSM8K_TEST.is_file() and GSM8K_TEST.with_name("train.jsonl").is_file()),
                                 reason="../shared/data/gsm8k not present")
needs_mmlu = pytest.mark.skipif(not MMLU_TEST.is_file(), reason="../shared/data/mmlu not present")

_LINE = re.compile(r"(\d*)([-+*/])(\d+)=(\d+)")  # from the 2nd line on the running value is implicit
_QUESTION = re.compile(r"(\w+) has (\d+) (\w+)\.")


# ---------------------------------------------------------------- arith generator

@pytest.fixture(scope="module")
def splits() -> dict[str, list[arith.Problem]]:
    return {"train": arith.generate("train", 2000, seed=0), "validation": arith.generate("validation", 300, seed=0),
            "test": arith.generate("test", 300, seed=0)}


def test_arith_splits_disjoint(splits):
    qs = {name: {p.question for p in ps} for name, ps in splits.items()}
    assert len(qs["train"]) == 2000 and len(qs["validation"]) == 300 and len(qs["test"]) == 300  # distinct within
    assert not qs["train"] & qs["validation"]
    assert not qs["train"] & qs["test"]
    assert not qs["validation"] & qs["test"]
    for name, ps in splits.items():
        assert all(arith.split_of(p.question) == name for p in ps)


def test_arith_splits_disjoint_across_seeds(splits):
    other = {p.question for p in arith.generate("train", 2000, seed=1)}
    assert not other & {p.question for p in splits["test"]}
    assert not other & {p.question for p in splits["validation"]}


def test_arith_deterministic(splits):
    assert arith.generate("test", 300, seed=0) == splits["test"]
    assert arith.generate("test", 300, seed=1) != splits["test"]
    # asking for more problems never changes the first ones
    assert arith.generate("test", 50, seed=0) == splits["test"][:50]


def _check_problem(p: arith.Problem) -> None:
    *lines, last = p.answer.split("\n")
    assert 2 <= len(lines) <= 4, p.answer
    assert last == f"#### {p.target}"
    m = _QUESTION.match(p.question)
    assert m, p.question
    value = int(m.group(2))
    for line in lines:
        lm = _LINE.fullmatch(line)
        assert lm, line
        first = line is lines[0]
        assert bool(lm.group(1)) == first, f"only the first line restates the value: {p.answer!r}"
        a, op, b, c = int(lm.group(1) or value), lm.group(2), int(lm.group(3)), int(lm.group(4))
        assert a == value, f"chain broken at {line!r} in {p.answer!r}"
        expect = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert c == expect, line
        assert 0 < c <= arith.MAX_VALUE
        value = c
    assert str(value) == p.target
    assert p.question.endswith(f"How many {m.group(3)} does {m.group(1)} have now?")
    assert p.question.count(".") == len(lines) + 1


def test_arith_answers_correct(splits):
    for ps in splits.values():
        for p in ps:
            _check_problem(p)
    steps = {len(p.answer.split("\n")) - 1 for p in splits["train"]}
    assert steps == {2, 3, 4}
    ops = {m.group(2) for p in splits["train"] for m in _LINE.finditer(p.answer)}
    assert ops == {"+", "-", "*", "/"}


def test_arith_reference_matches_target(splits):
    for p in splits["validation"]:
        assert reference_answer(p.answer) == p.target
        assert extract_strict(" " + p.answer) == p.target


def test_arith_argument_errors():
    with pytest.raises(ValueError, match="unknown split"):
        arith.generate("dev", 3)
    with pytest.raises(ValueError, match="n must be"):
        arith.generate("train", -1)
    with pytest.raises(ValueError, match="min_steps"):
        arith.generate("train", 3, min_steps=3, max_steps=2)
    assert arith.generate("train", 0) == []


def test_arith_examples_format():
    exs = arith_examples("test", 5, seed=0)
    for ex, p in zip(exs, arith.generate("test", 5, seed=0)):
        assert ex.prompt == f"Question: {p.question}\nAnswer:"
        assert ex.solution == " " + p.answer
        assert ex.gold == p.target and ex.kind == "gen"
        assert score(ex, ex.solution)["correct"]


# ---------------------------------------------------------------- scoring

@pytest.mark.parametrize(
    "completion, strict, flexible",
    [
        (" 3+4=7\n#### 7", "7", "7"),
        (" so 1,000 in total.\n#### 1,000", "1000", "1000"),
        (" The answer is $1,234.", None, "1234"),
        (" it costs $5\n#### $5", None, "5"),
        (" #### 42.", "42", "42"),
        (" #### -3", "-3", "-3"),
        (" 5-8=-3\nso -3 remains", None, "-3"),
        (" 2.5 then 3.75", None, "3.75"),
        (" no digits here", None, None),
        ("#### 12 and later 13", "12", "13"),
        (" 10\n####7", None, "7"),
    ],
)
def test_extraction(completion, strict, flexible):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible


def test_normalize_number():
    assert normalize_number(" $1,000. ") == "1000"
    assert normalize_number("-12") == "-12"
    assert normalize_number("$") is None
    assert normalize_number(None) is None


def test_truncate_at_stops():
    assert truncate_at_stops("a Question: b </s> c", GSM8K_STOPS) == "a "
    assert truncate_at_stops("a </s> Question: b", GSM8K_STOPS) == "a "
    assert truncate_at_stops("no stop", GSM8K_STOPS) == "no stop"
    assert truncate_at_stops("<|im_end|>x", GSM8K_STOPS) == ""


def test_score_generative_strict_vs_flexible():
    ex = Example("Question: q\nAnswer:", "7", " 3+4=7\n#### 7", "gen")
    assert score(ex, " 3+4=7\n#### 7") == {"pred": "7", "correct": True, "flexible_correct": True}
    # the model rambles into the next question: the stop sequence cuts it off
    r = score(ex, " 3+4=7\n#### 7\n\nQuestion: Sam has 2 cups.\nAnswer: 2+2=4\n#### 4")
    assert r["pred"] == "7" and r["correct"] and r["flexible_correct"]
    # without '####' only flexible-extract can be right
    r = score(ex, " 3+4=7 so the answer is 7.")
    assert r == {"pred": None, "correct": False, "flexible_correct": True}
    r = score(ex, " #### 8\nactually 7")
    assert r["pred"] == "8" and not r["correct"] and r["flexible_correct"]
    r = score(Example("p", "1000", "", "gen"), " #### 1,000.")
    assert r["correct"] and r["flexible_correct"]
    r = score(Example("p", "-4", "", "gen"), " 2-6=-4\n#### -4")
    assert r["correct"] and r["flexible_correct"]
    r = score(Example("p", "5", "", "gen"), " Question: #### 5")
    assert r == {"pred": None, "correct": False, "flexible_correct": False}


def test_score_multiple_choice():
    ex = Example("p", "B", " B", "mc")
    assert score(ex, " B") == {"pred": "B", "correct": True}
    assert score(ex, " B. 12") == {"pred": "B", "correct": True}
    assert score(ex, " The answer is C") == {"pred": "C", "correct": False}
    assert score(ex, " nothing") == {"pred": None, "correct": False}


def test_reference_answer():
    assert reference_answer("5*2=10\n#### 10") == "10"
    assert reference_answer("blah\n#### 1,250") == "1250"
    with pytest.raises(ValueError, match="####"):
        reference_answer("no marker 12")


# ---------------------------------------------------------------- arith-mc

def test_arith_mc():
    exs = load_examples("arith-mc", limit=200, split="test")
    assert len(exs) == 200
    problems = arith.generate("test", 200, seed=0 + 7919)
    for ex, p in zip(exs, problems):
        assert ex.kind == "mc" and ex.gold in LETTERS and ex.solution == " " + ex.gold
        lines = ex.prompt.split("\n")
        assert lines[0] == "The following are multiple choice questions (with answers) about arithmetic."
        assert lines[1] == "" and lines[2] == p.question and lines[-1] == "Answer:"
        options = lines[3:7]
        assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "]
        values = [o[3:] for o in options]
        assert len(set(values)) == 4
        assert all(v.isdigit() for v in values)
        assert values[LETTERS.index(ex.gold)] == p.target
    assert load_examples("arith-mc", limit=200, split="test") == exs
    golds = {ex.gold for ex in exs}
    assert golds == set(LETTERS)  # the gold letter is not always the same


# ---------------------------------------------------------------- gsm8k / mmlu

def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open() if line.strip()]


@needs_gsm8k
def test_gsm8k_loader():
    exs = load_examples("gsm8k", limit=4, data=GSM8K_TEST)
    rows = _rows(GSM8K_TEST)[:4]
    train = {(r["question"], r["answer"]) for r in _rows(GSM8K_TEST.with_name("train.jsonl"))}
    assert len(exs) == 4
    shots_prefix = None
    for ex, r in zip(exs, rows):
        assert ex.kind == "gen"
        target = f"Question: {r['question']}\nAnswer:"
        assert ex.prompt.endswith("\n\n" + target)
        prefix = ex.prompt[: -len(target)]
        assert prefix.endswith("\n\n") and not prefix.endswith("\n\n\n")
        shots = re.split(r"\n\n(?=Question: )", prefix[:-2])
        assert len(shots) == 5
        for shot in shots:
            m = re.fullmatch(r"Question: (.*?)\nAnswer: (.*)", shot, flags=re.S)
            assert m, shot[:80]
            assert (m.group(1), m.group(2)) in train
        # the same fixed exemplars for every question
        shots_prefix = shots_prefix or prefix
        assert prefix == shots_prefix
        assert ex.gold == r["answer"].split("####")[-1].strip().replace(",", "")
        assert ex.solution == " " + r["answer"]
        assert score(ex, ex.solution)["correct"]
    assert load_examples("gsm8k", limit=4, data=GSM8K_TEST) == exs


@needs_gsm8k
def test_gsm8k_zero_shot_and_default_path():
    exs = load_examples("gsm8k", limit=2, data=GSM8K_TEST, k_shot=0)
    rows = _rows(GSM8K_TEST)[:2]
    assert [ex.prompt for ex in exs] == [gsm8k_prompt(r["question"]) for r in rows]
    assert load_examples("gsm8k", limit=2, k_shot=0) == exs  # default data dir finds ../shared/data


@needs_mmlu
def test_mmlu_prompt_format():
    exs = load_examples("mmlu", limit=5, data=MMLU_TEST)
    for ex, r in zip(exs, _rows_head(MMLU_TEST, 5)):
        subject = r["subject"].replace("_", " ")
        c = r["choices"]
        expected = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                    f"{r['question']}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
        assert ex.prompt == expected
        assert ex.gold == "ABCD"[r["answer"]] and ex.kind == "mc" and ex.solution == " " + ex.gold


@needs_mmlu
def test_mmlu_few_shot_same_subject():
    exs = load_examples("mmlu", limit=3, data=MMLU_TEST, k_shot=2)
    rows = _rows_head(MMLU_TEST, 3)
    for ex, r in zip(exs, rows):
        header = f"The following are multiple choice questions (with answers) about {r['subject'].replace('_', ' ')}.\n\n"
        assert ex.prompt.startswith(header)
        assert ex.prompt.count("\nAnswer:") == 3
        assert ex.prompt.endswith(f"{r['question']}\nA. {r['choices'][0]}\nB. {r['choices'][1]}\nC. "
                                  f"{r['choices'][2]}\nD. {r['choices'][3]}\nAnswer:")
        body = ex.prompt[len(header):]
        assert body.count(r["question"]) == 1  # never its own exemplar


def _rows_head(path: Path, n: int) -> list[dict]:
    out = []
    with path.open() as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == n:
                break
    return out


# ---------------------------------------------------------------- errors

def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*arith"):
        load_examples("gsm9k")


@pytest.mark.parametrize("limit", [0, -5])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_examples("arith", limit=limit)


@pytest.mark.parametrize("task", ["gsm8k", "mmlu"])
def test_missing_data_file(task, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_examples(task, limit=2, data=tmp_path / "nope.jsonl")


def test_gsm8k_missing_train_for_shots(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "1+1=2\n#### 2"}) + "\n")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_examples("gsm8k", data=f)
    assert load_examples("gsm8k", data=f, k_shot=0)[0].gold == "2"


def test_bad_data_rows(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="GSM8K format"):
        load_examples("gsm8k", data=f, k_shot=0)
    with pytest.raises(ValueError, match="MMLU format"):
        load_examples("mmlu", data=f)
    f.write_text('{"question": "q", "answer": "2"}\n{oops\n')
    with pytest.raises(ValueError, match=r"test.jsonl:2 is not valid JSON"):
        load_examples("gsm8k", data=f, k_shot=0)


def test_tasks_listed():
    assert set(TASKS) == {"arith", "arith-hard", "arith-mc", "gsm8k", "mmlu"}
    assert len(load_examples("arith", limit=3)) == 3


def _canvas_spy(seen: dict):
    """A stand-in model that records the canvas `mdm_loss` feeds it and returns zero logits."""
    import torch

    from diffspec.models.llada import ModelOutput

    class Spy(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            seen["x"] = x.clone()
            return ModelOutput(logits=torch.zeros(*x.shape, 10, requires_grad=True))

    return Spy()


def test_block_masking_looks_like_a_semi_autoregressive_canvas():
    """Block rows: clean blocks before k, block k partly masked, everything after masked, only k scored."""
    import torch

    from diffspec.train.mdm import mdm_loss

    seen = {}
    Spy = lambda: _canvas_spy(seen)  # noqa: E731
    torch.manual_seed(0)
    B, P, L, mask = 64, 3, 12, 9
    ids = torch.randint(0, 8, (B, P + L))
    ans = torch.zeros(B, P + L, dtype=torch.bool)
    ans[:, P:] = True
    loss = mdm_loss(Spy(), ids, ans, torch.ones_like(ans), mask, block_length=4, block_fraction=1.0)
    assert torch.isfinite(loss)
    m = seen["x"][:, P:] == mask
    assert not (seen["x"][:, :P] == mask).any()  # the prompt is never masked
    for row in m:
        blocks = row.view(3, 4)
        k = next((i for i in range(3) if blocks[i].any()), None)
        if k is None:
            continue
        assert not blocks[:k].any() and blocks[k + 1 :].all()
    plain = mdm_loss(Spy(), ids, ans, torch.ones_like(ans), mask)  # LLaDA: masks anywhere in the answer
    m = seen["x"][:, P:] == mask
    assert any(bool(r[:4].any() and not r[8:].all()) for r in m)
    assert torch.isfinite(plain)


def test_arith_spec_sets_the_numbers_and_keeps_splits():
    hard = arith.generate("train", 300, seed=0, spec=arith.HARD)
    easy = arith.generate("train", 300, seed=0)
    line = re.compile(r"(\d*)([-+*/])(\d+)=(\d+)")
    ops = lambda ps: [(int(m[0] or 0), int(m[2]), int(m[3]), m[1]) for p in ps for m in line.findall(p.answer)]
    assert max(c for *_, c, _ in ops(easy)) <= arith.TASK.max_value
    assert max(b for _, b, _, op in ops(easy) if op in "+-") <= arith.TASK.max_operand
    assert "triples" not in " ".join(p.question for p in easy)
    assert max(c for *_, c, _ in ops(hard)) > arith.TASK.max_value
    assert any("triples" in p.question for p in hard)
    assert all(re.fullmatch(r"(\d+[-+*/]\d+=\d+\n)+#### \d+", p.answer) for p in hard)  # HARD restates
    assert all(arith.split_of(p.question) == "train" for p in hard)
    for bad in ({"max_operand": 0}, {"max_value": 3}, {"max_start": 60}, {"triple_prob": 1.5}):
        with pytest.raises(ValueError, match="ArithSpec"):
            arith.ArithSpec(**bad)


def test_content_block_choice_never_scores_pure_padding_blocks():
    import torch

    from diffspec.train.mdm import mdm_loss

    seen = {}
    Spy = lambda: _canvas_spy(seen)  # noqa: E731
    torch.manual_seed(0)
    B, P, L, mask, eos = 256, 3, 12, 9, 8
    ids = torch.randint(0, 8, (B, P + L))
    ids[:, P + 3:] = eos  # every answer ends in block 0 (block length 4): blocks 1 and 2 are padding
    ans = torch.zeros(B, P + L, dtype=torch.bool)
    ans[:, P:] = True
    for weighting in ("elbo", "mean"):
        loss = mdm_loss(Spy(), ids, ans, torch.ones_like(ans), mask, block_length=4, block_fraction=1.0,
                        block_k="content", eos_id=eos, weighting=weighting)
        assert torch.isfinite(loss)
        m = seen["x"][:, P:] == mask
        assert m[:, 4:].all()  # only block 0 was ever the partly masked block
    with pytest.raises(ValueError, match="eos_id"):
        mdm_loss(Spy(), ids, ans, torch.ones_like(ans), mask, block_length=4, block_fraction=1.0, block_k="content")


def test_k_shot_is_checked_where_the_examples_are_built():
    with pytest.raises(ValueError, match="k_shot .*>= 0"):
        load_examples("gsm8k", limit=1, data=GSM8K_TEST, k_shot=-1)
    with pytest.raises(ValueError, match="--k-shot applies to gsm8k and mmlu"):
        load_examples("arith", limit=1, k_shot=2)
