"""The `diffspec` lm-evaluation-harness model and diffspec's offline lm-eval tasks.

lm-eval runs the bundled models on `arith` (generation) and `arith_mc` (likelihood) with the same
accuracy as `diffspec eval` on the same examples, and on 5 GSM8K / MMLU examples read from
../shared/data; stop strings, max_gen_toks rounding, rolling likelihoods and bad model_args are
checked on the model directly. Skipped when lm-eval is not installed (`pip install -e '.[eval]'`),
except the check that the model module imports without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from diffspec.api import resolve_model
from diffspec.evaluation.evaluate import evaluate, task_config
from diffspec.tasks import load_examples
from diffspec.tasks.scoring import truncate_at_stops

from conftest import REPO_ROOT, SHARED_DATA

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DIFFSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "diffspec-cache"))
    monkeypatch.chdir(REPO_ROOT)  # the local tasks read ../shared/data relative to the repository root


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from diffspec.evaluation.harness_model import local_tasks_dir

    with pytest.MonkeyPatch.context() as mp:  # lm-eval's `pip list` for its environment report: 2 s a run
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        tasks = local_tasks_dir(SHARED_DATA, root=tmp_path_factory.mktemp("lm-eval-tasks"))
        yield simple_evaluate, TaskManager(include_path=str(tasks), include_defaults=False)


@pytest.fixture(scope="module")
def lm_model():
    pytest.importorskip("lm_eval")
    from diffspec.evaluation.harness_model import DiffspecLM, ModelArgsError

    return DiffspecLM, ModelArgsError


def req(*args):
    return SimpleNamespace(args=args)


def by_doc(samples):
    return sorted(samples, key=lambda s: s["doc_id"])


# ---------------------------------------------------------------- lm-eval against diffspec eval


def test_arith_generation_equals_diffspec_eval(harness, tmp_path) -> None:
    simple_evaluate, tm = harness
    cost = tmp_path / "cost.json"
    # Fast-dLLM (dual cache, threshold 0.9) for speed: any method gives the same answer both ways.
    res = simple_evaluate(model="diffspec", model_args=f"method=fast-dllm,cost_out={cost}", tasks=["arith"],
                          limit=8, batch_size=8, device="cpu", task_manager=tm, log_samples=True)
    model, tok = resolve_model(None, None, "cpu", None)
    ours = evaluate("arith", model, tok, "fast-dllm", task_config("arith", "fast-dllm", batch_size=8),
                    examples=load_examples("arith", limit=8), progress=False)
    assert res["results"]["arith"]["exact_match,strict-match"] == ours["accuracy"]
    assert res["results"]["arith"]["exact_match,flexible-extract"] == ours["accuracy_flexible"]
    samples = by_doc(res["samples"]["arith"])
    strict = [s for s in samples if s["filter"] == "strict-match"]
    assert [s["arguments"][0][0] for s in strict] == [e.prompt for e in load_examples("arith", limit=8)]
    for s, mine in zip(strict, ours["samples"]):  # the same completions, cut at the same stop strings
        assert s["resps"][0][0] == truncate_at_stops(mine["completion"], ["Question:", "</s>", "<|im_end|>"])
    c = json.loads(cost.read_text())
    assert c["requests"] == {"generate_until": 8} and c["method"] == "fast-dllm"
    for k in ("nfe", "tokens_processed", "flops", "tokens_generated", "sequences"):
        assert c["totals"][k] == ours[k]
    assert c["config"]["gen_length"] == 48 and c["config"]["steps"] == 48


def test_arith_hard_runs_through_lm_eval_as_diffspec_eval_does(harness) -> None:
    """The arith_hard YAML reads the same problems, with the task's 128-token budget."""
    simple_evaluate, tm = harness
    res = simple_evaluate(model="diffspec", model_args="method=fast-dllm", tasks=["arith_hard"], limit=2,
                          batch_size=2, device="cpu", task_manager=tm, log_samples=True)
    strict = [s for s in by_doc(res["samples"]["arith_hard"]) if s["filter"] == "strict-match"]
    examples = load_examples("arith-hard", limit=2)
    assert [s["arguments"][0][0] for s in strict] == [e.prompt for e in examples]
    assert [s["target"] for s in strict] == [e.solution.strip() for e in examples]
    assert strict[0]["arguments"][0][1]["max_gen_toks"] == 128


@pytest.mark.parametrize("method", ["vanilla", "ar"])
def test_arith_mc_likelihood_equals_diffspec_eval(harness, method) -> None:
    simple_evaluate, tm = harness
    res = simple_evaluate(model="diffspec", model_args=f"method={method},mc_num=4", tasks=["arith_mc"], limit=10,
                          batch_size=16, device="cpu", task_manager=tm, log_samples=True)
    model, tok = resolve_model(None, None, "cpu", None, method=method)
    ours = evaluate("arith-mc", model, tok, method, task_config("arith-mc", method, batch_size=16),
                    examples=load_examples("arith-mc", limit=10), scoring="likelihood", mc_num=4, progress=False)
    assert res["results"]["arith_mc"]["acc,none"] == ours["accuracy"]
    for s, mine in zip(by_doc(res["samples"]["arith_mc"]), ours["samples"]):
        assert s["arguments"][0][0] == load_examples("arith-mc", limit=10)[s["doc_id"]].prompt
        assert [r[0][0] for r in s["resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)


def test_arith_choice_whole_answer_likelihood(harness) -> None:
    simple_evaluate, tm = harness
    res = simple_evaluate(model="diffspec", model_args="method=ar", tasks=["arith_choice"], limit=6, batch_size=24,
                          device="cpu", task_manager=tm, log_samples=True)
    assert res["results"]["arith_choice"]["acc,none"] == 1.0  # the bundled AR target solves arith
    s = by_doc(res["samples"]["arith_choice"])[0]
    assert s["arguments"][0][0].startswith("Question: ") and s["arguments"][0][0].endswith("\nAnswer:")
    assert all(a[1].startswith(" ") and a[1].endswith("<|endoftext|>") for a in s["arguments"])


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(), reason="../shared/data is not here")
def test_gsm8k_and_mmlu_five_examples_through_the_bundled_model(harness, tmp_path, monkeypatch) -> None:
    simple_evaluate, tm = harness
    monkeypatch.chdir(tmp_path)  # the task copy names the data absolutely: any working directory works
    cost = tmp_path / "cost.json"
    res = simple_evaluate(model="diffspec", model_args=f"method=fast-dllm,threshold=0.9,cost_out={cost}",
                          tasks=["gsm8k_local", "mmlu_local"], limit=5, batch_size=8, device="cpu",
                          gen_kwargs="max_gen_toks=16", task_manager=tm, log_samples=True)
    r = res["results"]
    assert 0.0 <= r["gsm8k_local"]["exact_match,strict-match"] <= 1.0 and 0.0 <= r["mmlu_local"]["acc,none"] <= 1.0
    gsm = by_doc(res["samples"]["gsm8k_local"])
    assert len({s["doc_id"] for s in gsm}) == 5
    context = gsm[0]["arguments"][0][0]
    first = json.loads((SHARED_DATA / "gsm8k" / "test.jsonl").open().readline())
    assert context.count("Question:") == 6 and context.endswith(f"Question: {first['question']}\nAnswer:")  # 5-shot
    assert gsm[0]["arguments"][0][1]["until"] == ["Question:", "</s>", "<|im_end|>"]
    mmlu = by_doc(res["samples"]["mmlu_local"])
    row = json.loads((SHARED_DATA / "mmlu" / "test.jsonl").open().readline())
    subject = row["subject"].replace("_", " ")
    assert mmlu[0]["arguments"][0][0].startswith(f"The following are multiple choice questions (with answers) "
                                                  f"about {subject}.\n\n")
    assert [a[1] for a in mmlu[0]["arguments"]] == [" A", " B", " C", " D"]
    c = json.loads(cost.read_text())
    assert c["requests"] == {"generate_until": 5, "loglikelihood": 20}
    assert c["totals"]["nfe"] > 0 and c["config"]["gen_length"] == 16


# ---------------------------------------------------------------- the model's request types


@pytest.fixture(scope="module")
def tiny_lm(lm_model, tiny_checkpoint):
    DiffspecLM, _ = lm_model
    return DiffspecLM.create_from_arg_string(f"pretrained={tiny_checkpoint},method=vanilla,block_length=8",
                                             {"device": "cpu", "batch_size": 4})


def test_generate_until_cuts_at_stop_strings_and_rounds_to_blocks(tiny_lm, capsys) -> None:
    prompts = ["Question: Tom has 5 apples. Tom buys 3 more. How many apples does Tom have now?\nAnswer:",
               "Question: Ana has 7 pens.\nAnswer:", "Question: Sam has 2 cups. Sam doubles them.\nAnswer:"]
    plain = tiny_lm.generate_until([req(p, {"until": [], "max_gen_toks": 10}) for p in prompts])
    assert "rounded up to gen_length=16" in capsys.readouterr().err  # 10 tokens -> two blocks of 8, said so
    assert tiny_lm.last_config["gen_length"] == 16 and tiny_lm.last_config["steps"] == 16
    stops = [t[2:5] if len(t) >= 5 else "\x00" for t in plain]
    cut = tiny_lm.generate_until([req(p, {"until": [s, "never-there"], "max_gen_toks": 10})
                                  for p, s in zip(prompts, stops)])
    for full, stop, got in zip(plain, stops, cut):
        assert got == (full[: full.find(stop)] if stop in full else full)
    assert any(s in t for s, t in zip(stops, plain))  # a stop string really cut something
    # gen_kwargs' temperature / do_sample reach the decoder
    tiny_lm.generate_until([req(prompts[0], {"until": [], "max_gen_toks": 8, "do_sample": True,
                                             "temperature": 0.7})])
    assert tiny_lm.last_config["temperature"] == 0.7 and tiny_lm.last_config["gen_length"] == 8


def test_loglikelihood_rolling_ar_only(lm_model, tiny_lm) -> None:
    DiffspecLM, _ = lm_model
    with pytest.raises(NotImplementedError, match="autoregressive"):
        tiny_lm.loglikelihood_rolling([req("Tom has 5 apples.")])
    ar = DiffspecLM.create_from_arg_string("method=ar", {"device": "cpu"})
    from diffspec.evaluation.likelihood import ar_loglikelihood_rolling

    text = "Question: Tom has 5 apples. Tom buys 3 more.\nAnswer: 5+3=8\n#### 8"
    (got,) = ar.loglikelihood_rolling([req(text)])
    (want,) = ar_loglikelihood_rolling(ar.model, [ar.tokenizer.encode(text)])
    assert got == pytest.approx(want) and got < 0
    e = load_examples("arith", limit=1)[0]
    (lp, greedy), = ar.loglikelihood([req(e.prompt, e.solution)])
    assert lp > -1.0 and greedy  # the bundled AR target solves it


def test_model_args_win_over_lm_evals_own_flags(lm_model, tiny_checkpoint) -> None:
    DiffspecLM, _ = lm_model
    lm = DiffspecLM.create_from_arg_string(f"pretrained={tiny_checkpoint},device=cpu,batch_size=3",
                                           {"device": "cuda:0", "batch_size": 1})
    assert str(lm.device) == "cpu" and lm.options["batch_size"] == 3  # no "multiple values" clash
    with pytest.raises(ValueError, match="'depths' only applies to method 'psd'"):
        DiffspecLM.create_from_arg_string(f"pretrained={tiny_checkpoint},depths=1;3")
    psd = DiffspecLM.create_from_arg_string(f"pretrained={tiny_checkpoint},method=psd,depths=1;3,block_length=8",
                                            {"device": "cpu"})
    assert psd.options["depths"] == (1, 3)


@pytest.mark.parametrize("args,needle", [
    ("method=fast-dllm,treshold=0.9", "unknown model_arg 'treshold'"),
    ("method=fast-dllm,threshold=abc", "threshold='abc' is not a valid float"),
    ("method=fast-dllm,threshold=1.5", "threshold must be in (0, 1]"),
    ("method=vanilla,cache=dual", "does not use cache 'dual'"),
    ("method=vanilla,rule=exact_match", "only applies to method 'dualdiffusion'"),
    ("method=magic", "unknown method 'magic'"),
    ("pretrained=/no/such/checkpoint", "pretrained=/no/such/checkpoint"),
    ("mc_num=0", "mc_num=0 must be >= 1"),
    ("steps=many", "steps='many' is not a valid int"),
    ("device=tpu", "device=tpu"),
    ("dtype=float64", "dtype=float64"),
])
def test_bad_model_args_are_one_clear_line(lm_model, args, needle) -> None:
    DiffspecLM, ModelArgsError = lm_model
    with pytest.raises(ModelArgsError) as e:
        DiffspecLM.create_from_arg_string(args, {"device": "cpu"})
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # lm-eval's CLI indexes its ~10,000 task files first: about 18 s here
def test_cli_bad_model_args_exit_2_with_one_line(lm_model, capsys) -> None:
    from diffspec.evaluation.harness import main

    rc = main(["--model", "diffspec", "--model_args", "method=fast-dllm,treshold=0.9", "--tasks", "arith",
               "--device", "cpu", "--limit", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("diffspec.evaluation.harness: error: unknown model_arg 'treshold'")


def test_model_module_imports_without_lm_eval() -> None:
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import diffspec.evaluation.harness_model as m\n"
            "assert not m.HAVE_LM_EVAL\n"
            "try:\n    m.DiffspecLM()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
    assert "pip install -e '.[eval]'" in out.stdout


def test_apply_chat_template_renders_the_checkpoints_template(lm_model, tiny_checkpoint, tmp_path) -> None:
    import json
    import shutil

    DiffspecLM, ModelArgsError = lm_model
    d = tmp_path / "chat"
    shutil.copytree(tiny_checkpoint, d)
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    lm = DiffspecLM.create_from_arg_string(f"pretrained={d},block_length=8", {"device": "cpu"})
    history = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
               {"role": "user", "content": "2+2"}]
    assert lm.apply_chat_template(history) == "<user>1+1\n<assistant>2\n<user>2+2\n<assistant>"
    assert lm.apply_chat_template(history[:1], add_generation_prompt=False) == "<user>1+1\n"
    assert lm.chat_template(True) == template and lm.chat_template(False) is None
    assert str(d) in lm.tokenizer_name
    plain = DiffspecLM.create_from_arg_string(f"pretrained={tiny_checkpoint},block_length=8", {"device": "cpu"})
    with pytest.raises(ValueError, match="has no chat template"):
        plain.apply_chat_template(history)


def test_local_tasks_name_the_data_wherever_it_is(tmp_path, monkeypatch, capsys) -> None:
    from diffspec.evaluation.harness import main
    from diffspec.evaluation.harness_model import ModelArgsError, bundled_tasks_dir, check_local_data, local_tasks_dir

    data = tmp_path / "my data"
    (data / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        (data / "gsm8k" / f"{split}.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    monkeypatch.chdir(tmp_path)  # where ../shared/data does not exist
    out = local_tasks_dir(data, root=tmp_path / "tasks")
    gsm = (out / "gsm8k_local.yaml").read_text()
    assert f"test: {data.resolve()}/gsm8k/test.jsonl" in gsm and "../shared/data" not in gsm
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in bundled_tasks_dir().iterdir()
                                                            if f.suffix in (".yaml", ".py"))
    check_local_data("arith,gsm8k_local", data)  # present: no error
    with pytest.raises(ModelArgsError, match=r"task mmlu_local reads .*mmlu/test.jsonl, which does not exist; "
                                             r"set DIFFSPEC_DATA"):
        check_local_data("gsm8k_local,mmlu_local", data)
    monkeypatch.setenv("DIFFSPEC_DATA", str(tmp_path / "nowhere"))
    assert main(["--model", "diffspec", "--tasks=gsm8k_local", "--limit", "1"]) == 2  # before lm-eval runs
    assert "gsm8k/train.jsonl, which does not exist" in capsys.readouterr().err
