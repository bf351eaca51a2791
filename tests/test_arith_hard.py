"""`arith-hard`: seeded, answers verifiable from the question alone, splits disjoint, trainable."""
from __future__ import annotations

import json
import random
import re

import pytest

from diffspec.evaluation.evaluate import task_config
from diffspec.models.checkpoint import DEFAULT_MODEL_DIR, load_tokenizer
from diffspec.tasks import arith_hard, load_examples, score
from diffspec.tasks.arith import split_of

_SENT = re.compile(r"(?:\(\d+\) )?[^.?]+[.?]")
_LINE = re.compile(r"(?:\((\d+)\) )?(\w+(?:\+\w+)?): (\d+)([+-])(\d+)=(\d+)")


def solve(question: str) -> tuple[list[str], str]:
    """The working lines and the answer, worked out from the question text alone (an independent reader)."""
    have: dict[str, int] = {}
    lines: list[str] = []
    events = 0
    for s in (x.strip() for x in _SENT.findall(question)):
        if m := re.fullmatch(r"\((\d+)\) (.+)", s):
            events += 1
            assert int(m[1]) == events, f"event {m[1]} out of order in {question!r}"
            s, tag = m[2], f"({events}) "
        if m := re.fullmatch(r"(\w+) has (\d+) \w+\.", s):
            have[m[1]] = int(m[2])
        elif m := re.fullmatch(r"(\w+) (?:buys|finds|gets) (\d+) more\.", s):
            a, n = m[1], int(m[2])
            lines.append(f"{tag}{a}: {have[a]}+{n}={have[a] + n}")
            have[a] += n
        elif m := re.fullmatch(r"(\w+) (?:loses|sells|eats) (\d+)\.", s):
            a, n = m[1], int(m[2])
            lines.append(f"{tag}{a}: {have[a]}-{n}={have[a] - n}")
            have[a] -= n
        elif m := re.fullmatch(r"(\w+) gives (\w+) (\d+)\.", s):
            a, b, n = m[1], m[2], int(m[3])
            lines += [f"{tag}{a}: {have[a]}-{n}={have[a] - n}", f"{tag}{b}: {have[b]}+{n}={have[b] + n}"]
            have[a], have[b] = have[a] - n, have[b] + n
        elif m := re.fullmatch(r"How many \w+ do (\w+) and (\w+) have together\?", s):
            a, b = m[1], m[2]
            lines.append(f"{a}+{b}: {have[a]}+{have[b]}={have[a] + have[b]}")
            return lines, str(have[a] + have[b])
        elif m := re.fullmatch(r"How many \w+ does (\w+) have now\?", s):
            return lines, str(have[m[1]])
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    raise AssertionError("no question at the end")


def test_answers_follow_from_the_question():
    for p in arith_hard.generate("test", 300):
        lines, value = solve(p.question)
        assert p.answer == "\n".join(lines) + f"\n#### {value}"
        assert p.target == value
        for line in lines:
            m = _LINE.fullmatch(line)
            a, op, b, c = int(m[3]), m[4], int(m[5]), int(m[6])
            assert (a + b if op == "+" else a - b) == c and 1 <= c <= 50
            assert m[2].count("+") or 2 <= b <= 9  # events move one-digit amounts (a total adds two counts)
            assert (m[1] is None) == ("+" in m[2])  # every event line carries its event's number
        assert 7 <= len(lines) <= 8


def test_every_line_continues_the_line_above():
    """The chain parallel decoding must respect: each line starts from the result above it, the first from
    the question's count, and the final answer is the last result."""
    for p in arith_hard.generate("validation", 200):
        rows = [_LINE.fullmatch(x) for x in p.answer.split("\n")[:-1]]
        start = re.search(r"has (\d+) ", p.question)[1]
        assert [r[3] for r in rows] == [start] + [r[6] for r in rows[:-1]]
        assert p.target == rows[-1][6] and len({r[2] for r in rows}) == 1


def test_seeded_and_extends():
    a = arith_hard.generate("train", 50, seed=3)
    assert a == arith_hard.generate("train", 50, seed=3)
    assert arith_hard.generate("train", 80, seed=3)[:50] == a  # asking for more keeps the first ones
    assert a != arith_hard.generate("train", 50, seed=4)


def test_splits_are_disjoint():
    train = {p.question for p in arith_hard.generate("train", 3000)}
    for split in ("validation", "test"):
        other = arith_hard.generate(split, 300)
        assert all(split_of(p.question) == split for p in other)
        assert not train & {p.question for p in other}


def test_answers_fill_three_or_four_blocks_of_32():
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    lengths = [len(tok.encode(e.solution)) for e in load_examples("arith-hard", limit=300)]
    assert min(lengths) > 80 and max(lengths) < 128  # three or four blocks, and the EOS still fits the canvas
    assert sum(lengths) / len(lengths) > 100


def test_a_task_like_the_others():
    ex = load_examples("arith-hard", limit=3)
    assert ex[0].prompt.startswith("Question: ") and ex[0].prompt.endswith("\nAnswer:")
    assert score(ex[0], ex[0].solution)["correct"]
    assert not score(ex[0], ex[0].solution.replace(f"#### {ex[0].gold}", "#### 100"))["correct"]
    cfg = task_config("arith-hard", "vanilla")
    assert (cfg.gen_length, cfg.block_length, cfg.steps) == (128, 32, 128)
    with pytest.raises(ValueError, match="unknown split"):
        arith_hard.generate("dev", 1)


def test_make_problem_respects_the_line_range():
    rng = random.Random(0)
    for _ in range(50):
        p = arith_hard.make_problem(rng, 4, 5)
        assert 4 <= len(p.answer.split("\n")) - 1 <= 5


def test_a_training_pool_may_hold_shorter_stories_but_splits_stay_apart():
    pool = arith_hard.generate("train", 300, lines=(3, 8))
    counts = {len(p.answer.split("\n")) - 1 for p in pool}
    assert min(counts) == 3 and max(counts) == 8
    assert all(split_of(p.question) == "train" for p in pool)
    assert not {p.question for p in pool} & {p.question for p in arith_hard.generate("test", 500)}
    with pytest.raises(ValueError, match="lines"):
        arith_hard.generate("train", 1, lines=(5, 4))


def test_train_mdm_on_arith_hard(tmp_path):
    from diffspec.train.mdm import train_mdm

    cfg = {"tokenizer_from": str(DEFAULT_MODEL_DIR),
           "model": {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "mlp_hidden_size": 64,
                     "max_sequence_length": 320},
           "data": {"task": "arith-hard", "gen_length": 128, "block_length": 32, "pool": 50, "mc_fraction": 0.0},
           "train": {"steps": 2, "batch_size": 4, "warmup": 1, "eval_every": 2, "eval_n": 1, "save_every": 2,
                     "threads": 1, "two_stream_fraction": 0.5, "two_stream_block": 8},
           "out": str(tmp_path / "m"), "state_dir": str(tmp_path / "s")}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert (train_mdm(path) / "config.json").is_file()
    cfg["data"]["mc_fraction"] = 0.1
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mc_fraction"):
        train_mdm(path)
    cfg["data"].update(mc_fraction=0.0, lines=[3, 8], task="arith")  # a curriculum only arith-hard has
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="data.lines"):
        train_mdm(path)
    cfg["data"].pop("lines")
    cfg["data"]["recall_fraction"] = 0.5  # recall stories are arith-hard's too
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="recall_fraction"):
        train_mdm(path)


def test_a_recall_story_asks_who_changes_by_how_much_in_each_event():
    """Checked against the independent solver: each recall line is a working line without its
    arithmetic (same event number, name and signed amount, in order), the story is the problem's."""
    for p in arith_hard.generate("train", 200, lines=(3, 8)):
        r = arith_hard.recall(p)
        lines, _ = solve(p.question)
        events = [m for m in map(_LINE.fullmatch, lines) if m[1]]
        story = p.question.rsplit(" How many ", 1)[0]
        assert r.question == f"{story} {arith_hard.RECALL_QUESTION}"
        want = [f"({m[1]}) {m[2]}: {m[4]}{m[5]}" for m in events]
        assert r.answer == "\n".join(want) + f"\n#### {int(events[-1][1])}"
        assert r.target == events[-1][1]
    with pytest.raises(ValueError, match="not an arith-hard problem"):
        arith_hard.recall(arith_hard.Problem("Q?", "#### 3", "3"))


def test_recall_stories_come_after_a_pool_that_stays_the_same():
    from diffspec.tasks import arith_hard_examples

    plain = arith_hard_examples("train", 40, 0, (3, 8))
    mixed = arith_hard_examples("train", 40, 0, (3, 8), recall=10)
    assert mixed[:40] == plain and len(mixed) == 50
    assert all(arith_hard.RECALL_QUESTION in e.prompt and "=" not in e.solution for e in mixed[40:])
    nxt = arith_hard.generate("train", 50, 0, (3, 8))[40:]  # the stream's next ten problems, recalled
    assert [e.solution for e in mixed[40:]] == [" " + arith_hard.recall(p).answer for p in nxt]


def test_the_bundled_arith_hard_model_solves_the_chain():
    """The committed checkpoint is the trained one (configs/llada-arith-hard.json): on 4 validation
    problems at full steps it gets most answers right (a random or untrained model gets none)."""
    from diffspec.api import generate
    from diffspec.models.checkpoint import load_model

    model, tok = load_model(DEFAULT_MODEL_DIR.parent / "llada-arith-hard")
    examples = load_examples("arith-hard", split="validation", limit=4)
    texts = generate([e.prompt for e in examples], model=model, tokenizer=tok, method="vanilla",
                     gen_length=128, block_length=32, steps=128).texts
    assert sum(score(e, t)["correct"] for e, t in zip(examples, texts)) >= 2
