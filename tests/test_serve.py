"""`diffspec serve`, end to end: a real server on a free 127.0.0.1 port, the official `openai` client.

CPU only, loopback only, bounded: every request has a small generation length. No result depends
on the machine's speed or load: a test waits for an event (the server up, a queue depth, a
counter), never for a time, and no client or socket has a timeout; where batching is tested, the
engine's collection window is held open until every request is queued (`held_window`), so the
batches are the same on a busy machine as on an idle one. The server decodes with the bundled
arith model; answers are checked against `diffspec.api.generate` with the same options.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from diffspec.api import generate  # noqa: E402
from diffspec.serve import ServeSettings, create_app  # noqa: E402
from diffspec.tasks import gsm8k_prompt, load_examples  # noqa: E402

QUESTIONS = [e.prompt for e in load_examples("arith", limit=16)]  # "Question: …\nAnswer:"
Q0 = QUESTIONS[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread of this process (so tests can read its engine)."""

    def __init__(self, settings: ServeSettings):
        self.port = free_port()
        self.app = create_app(settings)
        self.service = self.app.state.service
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive())
        if not self.server.started:
            raise RuntimeError("the test server did not start")
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=None)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def health(self) -> dict:
        return get(self.url + "/health")[1]


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll `condition` until it holds. No deadline: how long an event takes depends on the machine's
    load, so a limit would fail a correct server on a busy machine (a hang shows as a hung test)."""
    while not condition():
        time.sleep(0.01)


def failed(futures: list[Future]) -> bool:
    """Whether a request thread raised (then waiting for its event would never end)."""
    return any(f.done() and f.exception() is not None for f in futures)


@contextmanager
def held_window(engine, max_queue: int | None = None) -> Iterator[Callable[[], None]]:
    """The engine's collection window held open (no batch starts before `release()`), so requests
    sent from several threads queue whatever their arrival times on a loaded machine; the engine's
    settings are restored after."""
    saved = engine.max_queue, engine.batch_window
    engine.batch_window = 1e6  # seconds: no machine reaches it; release() ends the wait
    engine.max_queue = max_queue or engine.max_queue

    def release() -> None:
        with engine.cond:
            engine.batch_window = saved[1]
            engine.cond.notify_all()

    try:
        yield release
    finally:
        release()
        engine.max_queue, engine.batch_window = saved


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body: bytes | dict) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


@pytest.fixture(scope="module")
def srv():
    s = Running(ServeSettings(method="fast-dllm", batch_window=0.15, max_batch=16, max_queue=64))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(srv):
    return srv.service.model, srv.service.tokenizer


def reference(model, prompts, method, **options):
    m, tok = model
    return generate(prompts, model=m, tokenizer=tok, method=method, **options)


def streamed_completion(client, **kw) -> tuple[str, str | None, object]:
    text, reason, usage = "", None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            reason = c.finish_reason or reason
    return text, reason, usage


# ---------------------------------------------------------------- answers


def test_models_and_health(srv):
    ids = [m.id for m in srv.client.models.list().data]
    assert ids == ["llada-arith"]
    h = srv.health()
    assert h["status"] == "ok" and h["family"] == "diffusion" and h["method"] == "fast-dllm"


@pytest.mark.parametrize("method,opts", [
    ("vanilla", {"gen_length": 32}),
    ("fast-dllm", {}),
    ("dkv-cache", {"gen_length": 32}),
    ("psd", {}),
    ("dualdiffusion", {"gen_length": 32}),
])
def test_completion_stream_equals_plain_equals_generate(srv, model, method, opts):
    ref = reference(model, [Q0], method, **opts).texts[0]
    kw = dict(model="llada-arith", prompt=Q0, extra_body={"diffspec": {"method": method, **opts}})
    plain = srv.client.completions.create(**kw)
    assert plain.choices[0].text == ref
    assert plain.choices[0].finish_reason == "stop"  # the answer ended with EOS
    assert plain.model_extra["diffspec"]["method"] == method
    text, reason, usage = streamed_completion(srv.client, **kw)
    assert text == ref and reason == "stop"
    assert usage.completion_tokens > 0 and usage.model_extra["diffspec"]["forwards"] > 0


@pytest.mark.parametrize("method,opts", [("fast-dllm", {"threshold": 0.9}), ("vanilla", {"gen_length": 32}),
                                         ("psd", {})])
def test_usage_counts_tokens_as_the_meter_does(srv, model, method, opts):
    """One definition of "tokens generated" (serve.engine's docstring): the streamed usage chunk's
    completion_tokens, its diffspec.tokens_generated, its meter, /health and `generate`'s own meter
    all count the answer through its first EOS, the EOS included; usage's tokens per forward is the
    meter's. (Before, completion_tokens left the EOS out: 18 against the meter's 19, TPF 6.0 / 6.33.)"""
    ref = reference(model, [Q0], method, **opts)
    before = srv.health()["stats"]["tokens_generated"]
    text, reason, usage = streamed_completion(srv.client, model="llada-arith", prompt=Q0,
                                              extra_body={"diffspec": {"method": method, **opts}})
    d = usage.model_extra["diffspec"]
    assert text == ref.texts[0] and reason == "stop"  # the answer ended with an EOS, which counts
    assert usage.completion_tokens == d["tokens_generated"] == d["meter"]["tokens_generated"] == \
        ref.meter.tokens_generated == srv.health()["stats"]["tokens_generated"] - before
    assert d["tokens_per_forward"] == d["meter"]["tokens_per_forward"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_choices_share_a_row_and_each_is_billed(srv, model):
    """n = 2 greedy: one decoded row, two identical choices; OpenAI's completion_tokens counts both,
    the meter (and diffspec.tokens_generated) the row once."""
    ref = reference(model, [Q0], "fast-dllm")
    r = srv.client.completions.create(model="llada-arith", prompt=Q0, n=2)
    d = r.usage.model_extra["diffspec"]
    assert [c.text for c in r.choices] == [ref.texts[0]] * 2
    assert r.usage.completion_tokens == 2 * d["tokens_generated"] == 2 * ref.meter.tokens_generated
    assert d["meter"]["tokens_generated"] == ref.meter.tokens_generated


def test_streaming_sends_several_chunks_as_blocks_finish(srv, model):
    """A masked diffusion answer arrives in pieces (each the final prefix so far), not in one chunk."""
    ref = reference(model, [Q0], "vanilla", gen_length=32).texts[0]
    chunks = [c.choices[0].text for c in srv.client.completions.create(
        model="llada-arith", prompt=Q0, stream=True, extra_body={"diffspec": {"method": "vanilla", "gen_length": 32}})
        if c.choices and c.choices[0].text]
    assert len(chunks) > 2 and "".join(chunks) == ref


def test_max_tokens_rounds_up_to_whole_blocks(srv, model):
    r = srv.client.completions.create(model="llada-arith", prompt=Q0, max_tokens=20)
    assert r.model_extra["diffspec"]["gen_length"] == 32  # two blocks of 16
    assert r.choices[0].text == reference(model, [Q0], "fast-dllm", gen_length=32).texts[0]


def test_chat_uses_generates_question_answer_template(srv, model):
    question = "Leo has 17 cups. Leo gets 6 more. Leo doubles them. How many cups does Leo have now?"
    ref = reference(model, [gsm8k_prompt(question)], "fast-dllm").texts[0]
    messages = [{"role": "user", "content": question}]
    r = srv.client.chat.completions.create(model="llada-arith", messages=messages)
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    pieces, roles, reasons = [], [], []
    for chunk in srv.client.chat.completions.create(model="llada-arith", messages=messages, stream=True):
        d = chunk.choices[0].delta
        roles += [d.role] if d.role else []
        pieces += [d.content] if d.content else []
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert "".join(pieces) == ref and roles == ["assistant"] and reasons == ["stop"]


@pytest.mark.parametrize("stop", ["\n", "=2", "3\n*", ["#", "*2"], "46", "never"])
def test_stop_string_cuts_inside_a_block(srv, model, stop):
    ref = reference(model, [QUESTIONS[1]], "fast-dllm").texts[0]  # ' 17+6=23\n*2=46\n#### 46'
    stops = [stop] if isinstance(stop, str) else stop
    expected = ref[:min([ref.find(s) for s in stops if s in ref] or [len(ref)])]
    kw = dict(model="llada-arith", prompt=QUESTIONS[1], stop=stop)
    r = srv.client.completions.create(**kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    text, reason, _ = streamed_completion(srv.client, **kw)
    assert text == expected and reason == "stop"  # nothing past the stop string was ever sent


def test_n_choices_and_sampling_reproduce_generate(srv, model):
    r = srv.client.completions.create(model="llada-arith", prompt=Q0, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text
    # Sampled: decoded alone, one row per choice, so the seed reproduces generate([p] * n).
    opts = {"method": "vanilla", "gen_length": 16}
    ref = reference(model, [Q0, Q0], "vanilla", gen_length=16, temperature=1.0, seed=3).texts
    r = srv.client.completions.create(model="llada-arith", prompt=Q0, n=2, temperature=1.0, seed=3,
                                      extra_body={"diffspec": opts})
    assert [c.text for c in r.choices] == ref
    texts = ["", ""]
    for chunk in srv.client.completions.create(model="llada-arith", prompt=Q0, n=2, temperature=1.0, seed=3,
                                               stream=True, extra_body={"diffspec": opts}):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == ref


def test_concurrent_requests_share_a_canvas(srv, model):
    """16 concurrent requests: every answer is generate's, with fewer forwards than 16 separate runs;
    the ones with other settings (every fourth: threshold 0.95) are decoded in a canvas of their own.
    The window is held until all 16 are queued, so there are exactly two batches, of 12 and 4 rows."""
    other = {"threshold": 0.95}
    opts = [other if i % 4 == 3 else {} for i in range(len(QUESTIONS))]
    refs = [reference(model, [q], "fast-dllm", **o) for q, o in zip(QUESTIONS, opts)]
    sequential_forwards = sum(r.meter.nfe for r in refs)
    engine = srv.service.engine
    before = srv.health()["stats"]

    def ask(i: int) -> str:
        kw = dict(model="llada-arith", prompt=QUESTIONS[i], extra_body={"diffspec": opts[i]})
        if i % 2:
            return streamed_completion(srv.client, **kw)[0]
        return srv.client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(len(QUESTIONS)) as pool, held_window(engine) as release:  # released before joined
        futures = [pool.submit(ask, i) for i in range(len(QUESTIONS))]
        wait_until(lambda: engine.queue_depth() == len(QUESTIONS) or failed(futures))
        release()
        texts = [f.result() for f in futures]
    assert texts == [r.texts[0] for r in refs]
    after = srv.health()["stats"]
    assert after["forwards"] - before["forwards"] < sequential_forwards
    assert after["batches"] - before["batches"] == 2
    assert after["max_rows_in_batch"] >= 12


def test_disconnected_client_frees_its_row(srv):
    before = srv.health()["stats"]
    stream = srv.client.completions.create(model="llada-arith", prompt=Q0, stream=True, max_tokens=64,
                                           extra_body={"diffspec": {"method": "vanilla"}})
    next(iter(stream))  # the first chunk, then hang up
    stream.close()
    stats = srv.service.engine.stats
    wait_until(lambda: stats.batches > before["batches"])  # (it has: the chunk came from it)
    ours = stats.batches  # its batch (one worker: every earlier one is done)
    wait_until(lambda: stats.batches_done >= ours)  # it ends either way; by then the row must be freed
    assert stats.freed_rows > before["freed_rows"], "the server kept decoding for a client that left"
    assert srv.health()["status"] == "ok"


# ---------------------------------------------------------------- errors


def _is_openai_error(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body,status,param,code", [
    ({"prompt": Q0, "diffspec": {"method": "nope"}}, 400, "diffspec.method", "unknown_method"),
    ({"prompt": Q0, "diffspec": {"method": "ar"}}, 400, "diffspec.method", "wrong_model_family"),
    ({"prompt": Q0, "diffspec": {"threshold": 2.0}}, 400, "diffspec.threshold", "invalid_options"),
    ({"prompt": Q0, "diffspec": {"method": "vanilla", "threshold": 0.5}}, 400, "diffspec.threshold",
     "invalid_options"),
    ({"prompt": Q0, "diffspec": {"method": "psd", "depths": "3,1"}}, 400, "diffspec.depths", "invalid_options"),
    ({"prompt": Q0, "diffspec": {"bogus": 1}}, 400, "diffspec.bogus", "unknown_option"),
    ({"prompt": Q0, "diffspec": {"batch_size": 4}}, 400, "diffspec.batch_size", None),
    ({"prompt": Q0, "diffspec": {"method": "dualdiffusion", "drafter": "/etc"}}, 400, "diffspec.drafter", None),
    ({"prompt": Q0, "temperature": -1}, 400, "temperature", "invalid_options"),
    ({"prompt": Q0, "top_p": 0.5}, 400, "top_p", "unsupported_parameter"),
    ({"prompt": Q0, "max_tokens": 0}, 400, "max_tokens", None),
    ({"prompt": Q0, "n": 0}, 400, "n", None),
    ({"prompt": Q0, "stop": [1]}, 400, "stop", None),
    ({"prompt": "   "}, 400, "prompt", "empty_prompt"),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": "1 + 1 = " * 400}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": Q0, "max_tokens": 100000}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": Q0, "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ({"prompt": Q0, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": Q0, "model": 3}, 400, "model", None),
])
def test_errors_are_openai_shaped(srv, body, status, param, code):
    code_, _, out = post(srv.url + "/v1/completions", {"model": "llada-arith", **body})
    assert code_ == status
    err = _is_openai_error(out)
    assert err["param"] == param and err["code"] == code
    assert err["type"] == "invalid_request_error"


def test_more_error_classes(srv):
    status, _, out = post(srv.url + "/v1/completions", b"{not json")
    assert status == 400 and _is_openai_error(out)["type"] == "invalid_request_error"
    status, _, out = post(srv.url + "/v1/chat/completions", {"model": "llada-arith", "messages": []})
    assert status == 400 and _is_openai_error(out)["param"] == "messages"
    status, _, out = post(srv.url + "/v1/chat/completions",
                          {"model": "llada-arith", "messages": [{"role": "assistant", "content": "hi"}]})
    assert status == 400 and _is_openai_error(out)["param"] == "messages"
    status, out = get(srv.url + "/v1/models/nope")
    assert status == 404 and _is_openai_error(out)["code"] == "model_not_found"
    status, out = get(srv.url + "/v1/nothing-here")
    assert status == 404 and _is_openai_error(out)
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="gpt-4", prompt=Q0)
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model="llada-arith", prompt=Q0, extra_body={"diffspec": {"method": "nope"}})
    assert "unknown method" in str(e.value)
    with pytest.raises(openai.BadRequestError):  # a streamed request is refused before any chunk
        list(srv.client.completions.create(model="llada-arith", prompt="", stream=True))


def test_full_queue_answers_429_with_retry_after(srv, model):
    """A queue of two rows, held until five requests have arrived: two are served, three refused."""
    engine = srv.service.engine
    rejected = engine.stats.rejected

    def ask(_):
        return post(srv.url + "/v1/completions", {"model": "llada-arith", "prompt": Q0})

    with ThreadPoolExecutor(5) as pool, held_window(engine, max_queue=2) as release:
        futures = [pool.submit(ask, i) for i in range(5)]
        wait_until(lambda: (engine.stats.rejected - rejected == 3 and engine.queue_depth() == 2) or failed(futures))
        release()
        results = [f.result() for f in futures]
    refused = [r for r in results if r[0] == 429]
    served = [r for r in results if r[0] == 200]
    assert len(served) == 2 and len(refused) == 3
    for _, headers, body in refused:
        assert int(headers["retry-after"]) >= 1 and _is_openai_error(body)["type"] == "rate_limit_error"
    ref = reference(model, [Q0], "fast-dllm").texts[0]
    assert all(body["choices"][0]["text"] == ref for _, _, body in served)


def test_server_still_healthy_and_correct_after_errors(srv, model):
    assert srv.health()["status"] == "ok"
    r = srv.client.completions.create(model="llada-arith", prompt=QUESTIONS[2])
    assert r.choices[0].text == reference(model, [QUESTIONS[2]], "fast-dllm").texts[0]
    assert srv.health()["stats"]["errors"] == 0  # every bad request was refused before it reached a batch


# ---------------------------------------------------------------- an AR target, and the CLI


def test_ar_target_streams_tokens_and_serves_speculative_methods():
    s = Running(ServeSettings(method="ar", batch_window=0.0))
    try:
        m = (s.service.model, s.service.tokenizer)
        assert [x.id for x in s.client.models.list().data] == ["qwen3-arith"]
        for method in ("ar", "ar-spec"):
            res = reference(m, [Q0], method, gen_length=32)
            ref = res.texts[0]
            kw = dict(model="qwen3-arith", prompt=Q0, max_tokens=32, extra_body={"diffspec": {"method": method}})
            assert s.client.completions.create(**kw).choices[0].text == ref
            text, reason, usage = streamed_completion(s.client, **kw)
            assert text == ref and reason == "stop"
            # one definition of tokens generated for the AR methods too (ar-spec's meter counted them twice)
            d = usage.model_extra["diffspec"]
            assert usage.completion_tokens == d["tokens_generated"] == d["meter"]["tokens_generated"] == \
                res.meter.tokens_generated
            assert d["tokens_per_forward"] == d["meter"]["tokens_per_forward"]
        chunks = [c for c in s.client.completions.create(model="qwen3-arith", prompt=Q0, max_tokens=32, stream=True)
                  if c.choices and c.choices[0].text]
        assert len(chunks) > 3  # plain AR: token by token
        status, _, out = post(s.url + "/v1/completions", {"prompt": Q0, "diffspec": {"method": "psd"}})
        assert status == 400 and _is_openai_error(out)["code"] == "wrong_model_family"
    finally:
        s.stop()


def test_cli_serve_starts_and_answers():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffspec.cli", "serve", "--port", str(port), "--method",
                             "fast-dllm", "--gen-length", "16"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:  # until it answers or exits: however long a busy machine takes to start it
            assert proc.poll() is None, proc.stderr.read()
            try:
                status, body = get(f"http://127.0.0.1:{port}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert status == 200 and body["method"] == "fast-dllm"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=None)
        r = client.completions.create(model="llada-arith", prompt=Q0)
        assert r.model_extra["diffspec"]["gen_length"] == 16 and r.choices[0].text
    finally:
        proc.terminate()
        proc.wait()


def test_cli_serve_refuses_bad_defaults_before_loading(capsys):
    from diffspec.cli import main

    assert main(["serve", "--method", "vanilla", "--threshold", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffspec: error:") and "threshold" in err


def test_a_failing_request_does_not_fail_its_batch(srv, model):
    """A row that breaks its batch (here: a prompt longer than the model's positions, which validation
    refuses) is retried alone; its companions still get their answers."""
    from diffspec.serve.scheduler import Job, Prompt

    m, tok = model
    svc, events = srv.service, {}
    cfg = svc.parser.config({})[1]
    long = Q0 * (m.config.max_sequence_length // len(tok.encode(Q0)) + 1)
    prompts = [Prompt(Q0, tok.encode(Q0)), Prompt(long, tok.encode(long)), Prompt(QUESTIONS[1], tok.encode(QUESTIONS[1]))]
    jobs = []
    for i, p in enumerate(prompts):
        job = Job("fast-dllm", cfg, [p], 1, [], svc.eos_ids, None)
        job.sink = events.setdefault(i, []).append
        jobs.append(job)
    svc.engine.run_jobs(jobs)
    texts = {i: "".join(e[2] for e in ev if e[0] == "delta") for i, ev in events.items()}
    assert texts[0] == reference(model, [Q0], "fast-dllm").texts[0] and events[0][-1][0] == "done"
    assert texts[2] == reference(model, [QUESTIONS[1]], "fast-dllm").texts[0] and events[2][-1][0] == "done"
    assert events[1][-1][0] == "error" and events[1][-1][1].status == 400


def test_requests_sharing_a_canvas_each_count_their_own_tokens(srv, model):
    """Two requests decoded in one canvas (run_jobs: one batch, whatever the machine's speed): each
    usage counts its own answer as `generate` does, its TPF divides that by the forwards its row took
    part in (a whole number of them, at most the batch's), and the server's total counts each row once."""
    from diffspec.serve.scheduler import Job, Prompt

    _, tok = model
    svc, events = srv.service, {}
    cfg = svc.parser.config({})[1]
    questions = [Q0, QUESTIONS[1]]
    jobs = [Job("fast-dllm", cfg, [Prompt(q, tok.encode(q))], 1, [], svc.eos_ids, None) for q in questions]
    for i, job in enumerate(jobs):
        job.sink = events.setdefault(i, []).append
    before = svc.engine.stats.tokens_generated
    svc.engine.run_jobs(jobs)
    usages = [events[i][-1][1] for i in range(2)]
    assert [e[-1][0] for e in events.values()] == ["done", "done"]
    for q, u in zip(questions, usages):
        d = u["diffspec"]
        assert d["batch_rows"] == 2
        alone = reference(model, [q], "fast-dllm").meter.tokens_generated
        assert u["completion_tokens"] == d["tokens_generated"] == alone
        forwards = d["tokens_generated"] / d["tokens_per_forward"]
        assert forwards == pytest.approx(round(forwards)) and 0 < round(forwards) <= d["forwards"]
    assert svc.engine.stats.tokens_generated - before == sum(u["completion_tokens"] for u in usages)


def test_request_options_follow_the_cli_rules():
    """Server defaults apply to requests that keep the server's method; max_tokens keeps its steps per block."""
    from diffspec.serve.protocol import RequestParser

    p = RequestParser("vanilla", {"steps": 24}, "diffusion", 16)  # gen 48: 3 blocks of 8 steps
    _, cfg, _ = p.config({"max_tokens": 16})
    assert (cfg.gen_length, cfg.steps) == (16, 8)
    _, cfg, _ = p.config({"max_tokens": 16, "diffspec": {"steps": 4}})
    assert (cfg.gen_length, cfg.steps) == (16, 4)
    method, cfg, _ = p.config({"diffspec": {"method": "psd", "lossless": "true", "depths": [1, 2, 3]}})
    assert method == "psd" and cfg.lossless and cfg.depths == (1, 2, 3) and cfg.decode.steps == 48
    with pytest.raises(Exception) as e:
        p.config({"diffspec": {"steps": 7}})
    assert e.value.status == 400 and e.value.param == "diffspec.steps"


# ---------------------------------------------------------------- the text stream itself


@pytest.fixture(scope="module")
def tok():
    from diffspec.models.checkpoint import DEFAULT_MODEL_DIR
    from diffspec.models.tokenizer import Tokenizer

    return Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.json")


def _feed_one_by_one(tok, text, stops=(), eos=None):
    from diffspec.serve.text import TextStream

    ids = tok.encode(text) + ([eos] if eos is not None else [])
    stream = TextStream(lambda x: tok.decode(x, skip_special_tokens=True), stops, [eos] if eos is not None else [])
    deltas = [stream.update(ids[:k]) for k in range(len(ids) + 1)]
    deltas.append(stream.update(ids, complete=True))
    return deltas, stream


def test_text_stream_never_splits_a_character(tok):
    text = "x = é€😀 ok"
    deltas, stream = _feed_one_by_one(tok, text)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert stream.finish_reason == "length" and stream.completion_tokens == len(tok.encode(text))


@pytest.mark.parametrize("stops,expected", [(["=46"], " 17+6=23\n*2"), (["\n*2=4", "#"], " 17+6=23"),
                                            (["never"], " 17+6=23\n*2=46\n#### 46")])
def test_text_stream_holds_back_a_possible_stop_string(tok, stops, expected):
    deltas, stream = _feed_one_by_one(tok, " 17+6=23\n*2=46\n#### 46", stops)
    assert "".join(deltas) == expected
    sent = ""
    for d in deltas:  # at no point did the client hold text past the cut
        sent += d
        assert expected.startswith(sent)


def test_text_stream_ends_at_eos(tok):
    from diffspec.models.tokenizer import EOS_TOKEN

    deltas, stream = _feed_one_by_one(tok, " 2-1=1", eos=tok.token_to_id(EOS_TOKEN))
    assert "".join(deltas) == " 2-1=1" and stream.finish_reason == "stop" and stream.hit_eos
    assert stream.completion_tokens == len(tok.encode(" 2-1=1")) + 1  # the EOS was generated: it counts
