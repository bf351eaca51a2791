"""`diffspec serve` in production (issue #38): graceful shutdown on SIGTERM, the API key, request
size limits, /metrics and the access log, each against a real server process.

Every server is `python -m diffspec.cli serve` on a free 127.0.0.1 port with the bundled model; its
stderr goes to a file the tests read. As in test_serve.py, nothing depends on the machine's speed:
a test waits for an event (the server answers /health, a gauge reaches a value, a log line
appears, the process exits), never for a time, and no client or socket has a timeout. Where a
request must still be in flight when something happens, the test holds it there itself: a request
whose body is half sent is admitted but cannot finish, and a request queued behind a collection
window of 10^5 s cannot start until the server stops waiting.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from diffspec.api import generate  # noqa: E402
from diffspec.tasks import load_examples  # noqa: E402

QUESTIONS = [e.prompt for e in load_examples("arith", limit=4)]
Q0, Q1 = QUESTIONS[0], QUESTIONS[1]
KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll until `condition` holds; no deadline (a hang shows as a hung test, never as a flaky one)."""
    while not condition():
        time.sleep(0.02)


def request(port: int, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def openai_error(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


class Server:
    """`diffspec serve` as a subprocess on loopback, its stderr in a file."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="diffspec-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        full_env = {k: v for k, v in os.environ.items() if k != "DIFFSPEC_API_KEY"}
        full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
        self.proc = subprocess.Popen([sys.executable, "-m", "diffspec.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), *args], env=full_env,
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        while True:  # until it answers or exits: however long a busy machine takes to load the model
            assert self.proc.poll() is None, self.log()
            try:
                if self.get("/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return request(self.port, "GET", path, headers=headers)

    def post(self, path: str, body: bytes | dict, headers: dict[str, str] | None = None):
        return request(self.port, "POST", path, body, headers)

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/health")[2])

    def settled_metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """/metrics once every request this client sent is fully recorded (none in flight any more)."""
        wait_until(lambda: self.metrics(headers)["diffspec_requests_in_flight"] == 0)
        return self.metrics(headers)

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",…}': value}."""
        status, h, raw = self.get("/metrics", headers)
        assert status == 200 and h["content-type"].startswith("text/plain"), (status, raw)
        out = {}
        for family in text_string_to_metric_families(raw.decode()):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + ("{" + labels + "}" if labels else "")] = s.value
        return out

    def client(self, key: str = "unused") -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def model():
    from diffspec.api import resolve_model

    return resolve_model(None, None, "cpu", None, method="vanilla")


def reference(model, prompt: str, **options) -> str:
    m, tok = model
    return generate([prompt], model=m, tokenizer=tok, **options).texts[0]


class HalfSent:
    """A POST whose body is half sent: the server has admitted it (it is in flight) and waits for the rest."""

    def __init__(self, port: int, path: str, body: dict, headers: dict[str, str]):
        self.raw = json.dumps(body).encode()
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.conn.putrequest("POST", path)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(self.raw)), **headers}.items():
            self.conn.putheader(k, v)
        self.conn.endheaders()
        self.conn.send(self.raw[:10])

    def finish(self) -> tuple[int, str]:
        self.conn.send(self.raw[10:])
        r = self.conn.getresponse()
        return r.status, r.read().decode()

    def close(self) -> None:
        self.conn.close()


def sse_text(raw: str) -> tuple[str, list[Any], bool]:
    """(concatenated text, finish reasons, whether [DONE] came) of a completions / chat event stream."""
    text, reasons, done = "", [], False
    for line in raw.splitlines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        ev = json.loads(line[6:])
        assert "error" not in ev, ev
        for c in ev["choices"]:
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            if c.get("finish_reason"):
                reasons.append(c["finish_reason"])
    return text, reasons, done


# ---------------------------------------------------------------- graceful shutdown


def _hold_two_requests(srv: Server, headers: dict[str, str]) -> tuple[HalfSent, Any, dict]:
    """Put two requests in flight: A, whose body is half sent, and B, a chat stream that has received its
    first chunk and is queued behind the 10^5 s collection window. Returns (A, B's thread result, its box)."""
    half = HalfSent(srv.port, "/v1/completions",
                    {"model": "llada-arith", "prompt": Q1, "stream": True}, headers)
    box: dict[str, Any] = {}
    first_chunk = threading.Event()

    def stream_b() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port)
            conn.request("POST", "/v1/chat/completions", json.dumps({
                "model": "llada-arith", "stream": True,
                "messages": [{"role": "user", "content": Q0.removeprefix("Question: ").removesuffix("\nAnswer:")}],
            }), {"Content-Type": "application/json", **headers})
            r = conn.getresponse()
            box["status"] = r.status
            lines = [r.readline().decode()]  # the role chunk: the stream is open
            first_chunk.set()
            lines.append(r.read().decode())
            box["raw"] = "".join(lines)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e
        finally:
            first_chunk.set()

    thread = threading.Thread(target=stream_b, daemon=True)
    thread.start()
    first_chunk.wait()
    assert "error" not in box, box
    wait_until(lambda: srv.health()["queue_rows"] == 1)  # B waits in the queue
    gauges = srv.metrics(headers)
    assert gauges["diffspec_requests_in_flight"] == 2 and gauges["diffspec_queue_rows"] == 1
    return half, thread, box


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(model):
    # The key comes from the environment variable here (the other tests use --api-key).
    srv = Server("--method", "vanilla", "--gen-length", "32", "--batch-window", "100000", "--drain-timeout", "100000",
                 env={"DIFFSPEC_API_KEY": KEY})
    try:
        half, thread, box = _hold_two_requests(srv, AUTH)
        srv.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: srv.get("/health")[0] == 503)  # draining: /health tells load balancers
        assert srv.health()["status"] == "draining"
        # a new request is refused with an OpenAI-shaped 503 (A still holds the drain open)
        status, headers, raw = srv.post("/v1/completions", {"model": "llada-arith", "prompt": Q0}, AUTH)
        assert status == 503 and openai_error(raw)["code"] == "shutting_down"
        assert headers["x-request-id"].startswith("req-")
        assert srv.proc.poll() is None
        # B: queued at SIGTERM, its stream already open; it starts at once (no companion will come) and ends whole
        thread.join()
        assert "error" not in box and box["status"] == 200, box
        text_b, reasons_b, done_b = sse_text(box["raw"])
        assert done_b and reasons_b and text_b == reference(model, Q0, method="vanilla", gen_length=32)
        # A: admitted before SIGTERM, its body completed after it; answered in full
        status_a, raw_a = half.finish()
        half.close()
        text_a, reasons_a, done_a = sse_text(raw_a)
        assert status_a == 200 and done_a and reasons_a
        assert text_a == reference(model, Q1, method="vanilla", gen_length=32)
        assert srv.proc.wait() == 0, srv.log()
        log = srv.log()
        assert "SIGTERM: draining" in log and "drained: every admitted request is answered" in log
    finally:
        srv.stop()


def test_drain_timeout_fails_unfinished_requests_with_503_and_exits_0():
    srv = Server("--method", "vanilla", "--gen-length", "32", "--batch-window", "100000", "--drain-timeout", "0",
                 "--api-key", KEY)
    try:
        half, thread, box = _hold_two_requests(srv, AUTH)
        srv.proc.send_signal(signal.SIGTERM)
        thread.join()  # B, still queued when the drain time (0 s) was up, gets a 503 as its stream's last event
        assert box["status"] == 200, box
        events = [json.loads(line[6:]) for line in box["raw"].splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "shutting_down" and "--drain-timeout" in events[-1]["error"]["message"]
        assert box["raw"].rstrip().endswith("data: [DONE]")
        half.close()  # A never sent its body; its connection goes
        assert srv.proc.wait() == 0, srv.log()
        assert "--drain-timeout (0 s) reached" in srv.log()
    finally:
        srv.stop()


def test_a_second_sigterm_stops_at_once():
    srv = Server("--method", "vanilla", "--gen-length", "32", "--drain-timeout", "100000")
    try:
        half = HalfSent(srv.port, "/v1/completions", {"model": "llada-arith", "prompt": Q0}, {})
        wait_until(lambda: srv.metrics()["diffspec_requests_in_flight"] == 1)  # it would hold the drain open
        srv.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: srv.get("/health")[0] == 503)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait() == 0  # without waiting for the half-sent request
        assert "SIGTERM again: stopping now" in srv.log()
        half.close()
    finally:
        srv.stop()


# ---------------------------------------------------------------- key, limits, metrics, access log


@pytest.fixture(scope="module")
def guarded():
    srv = Server("--method", "vanilla", "--gen-length", "32", "--api-key", KEY, "--limit-prompt-tokens", "200",
                 "--limit-max-tokens", "32", "--limit-n", "2", "--limit-body-bytes", "4000", "--batch-window", "0")
    yield srv
    srv.stop()


def test_api_key_guards_every_endpoint_but_health(guarded, model):
    assert guarded.get("/health")[0] == 200
    for path in ("/v1/models", "/v1/models/llada-arith", "/metrics", "/docs", "/openapi.json", "/nope"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}):
            status, h, raw = guarded.get(path, headers)
            assert status == 401, (path, headers, status)
            assert openai_error(raw)["code"] == "invalid_api_key" and h["www-authenticate"] == "Bearer"
    status, _, raw = guarded.post("/v1/completions", {"model": "llada-arith", "prompt": Q0})
    assert status == 401 and "--api-key" in openai_error(raw)["message"]
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    # the right key: the official client works, and the answer is generate's
    client = guarded.client(KEY)
    assert [m.id for m in client.models.list().data] == ["llada-arith"]
    r = client.completions.create(model="llada-arith", prompt=Q0)
    assert r.choices[0].text == reference(model, Q0, method="vanilla", gen_length=32)
    assert guarded.get("/metrics", {"Authorization": f"bearer {KEY}"})[0] == 200  # the scheme is case-blind


@pytest.mark.parametrize("body,status,param,code,flag", [
    ({"prompt": "1 + 1 = " * 30}, 400, "prompt", "prompt_too_long", "--limit-prompt-tokens"),
    ({"prompt": Q0, "max_tokens": 33}, 400, "max_tokens", "max_tokens_too_large", "--limit-max-tokens"),
    ({"prompt": Q0, "diffspec": {"gen_length": 64}}, 400, "max_tokens", "max_tokens_too_large",
     "--limit-max-tokens"),
    ({"prompt": Q0, "n": 3}, 400, "n", "n_too_large", "--limit-n"),
    ({"prompt": Q0 + " " * 4000}, 413, None, "request_too_large", "--limit-body-bytes"),
])
def test_request_size_limits_name_their_flag(guarded, body, status, param, code, flag):
    got, _, raw = guarded.post("/v1/completions", {"model": "llada-arith", **body}, AUTH)
    err = openai_error(raw)
    assert (got, err["param"], err["code"]) == (status, param, code) and flag in err["message"], err


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(guarded):
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port)
    chunks = [json.dumps({"model": "llada-arith", "prompt": Q0 + " " * 5000}).encode()[i:i + 1000]
              for i in range(0, 5200, 1000)]
    conn.request("POST", "/v1/completions", body=iter(chunks), encode_chunked=True,
                 headers={"Content-Type": "application/json", **AUTH})  # no Content-Length
    r = conn.getresponse()
    assert r.status == 413 and openai_error(r.read())["code"] == "request_too_large"
    conn.close()


def test_requests_within_the_limits_are_answered(guarded, model):
    client = guarded.client(KEY)
    r = client.completions.create(model="llada-arith", prompt=Q1, max_tokens=32, n=2)
    ref = reference(model, Q1, method="vanilla", gen_length=32)
    assert [c.text for c in r.choices] == [ref, ref]


def test_metrics_count_requests_tokens_forwards_and_latencies(guarded):
    before = guarded.settled_metrics(AUTH)
    client = guarded.client(KEY)
    for prompt in (Q0, Q1):
        list(client.completions.create(model="llada-arith", prompt=prompt, stream=True))
    client.chat.completions.create(model="llada-arith", messages=[{"role": "user", "content": "What is 2 + 3?"}])
    guarded.get("/v1/models")  # a 401
    guarded.post("/v1/completions", {"model": "llada-arith", "prompt": Q0, "n": 0}, AUTH)  # a 400
    after = guarded.settled_metrics(AUTH)
    health = guarded.health()

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta('diffspec_http_requests_total{code="200",endpoint="/v1/completions"}') == 2
    assert delta('diffspec_http_requests_total{code="200",endpoint="/v1/chat/completions"}') == 1
    assert delta('diffspec_http_requests_total{code="401",endpoint="/v1/models"}') == 1
    assert delta('diffspec_http_requests_total{code="400",endpoint="/v1/completions"}') == 1
    assert delta('diffspec_time_to_first_token_seconds_count{endpoint="/v1/completions"}') == 2
    assert delta('diffspec_time_to_first_token_seconds_count{endpoint="/v1/chat/completions"}') == 1
    assert delta('diffspec_request_latency_seconds_count{endpoint="/v1/completions"}') == 3
    assert after['diffspec_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'] \
        == after['diffspec_request_latency_seconds_count{endpoint="/v1/completions"}']
    # the engine's counters are /health's, read at scrape time
    stats = health["stats"]
    assert after["diffspec_tokens_generated_total"] == stats["tokens_generated"] and delta(
        "diffspec_tokens_generated_total") > 0
    assert after["diffspec_forwards_total"] == stats["forwards"] and delta("diffspec_forwards_total") > 0
    assert after["diffspec_requests_admitted_total"] == stats["requests"]
    assert after["diffspec_queue_rows"] == 0 and after["diffspec_running_rows"] == 0
    assert after["diffspec_requests_in_flight"] == 0 and after["diffspec_draining"] == 0


def test_every_request_gets_an_id_and_one_access_log_line(guarded):
    status, h, _ = guarded.post("/v1/completions", {"model": "llada-arith", "prompt": Q0}, AUTH)
    rid = h["x-request-id"]
    assert status == 200 and rid.startswith("req-")
    ours = {"x-request-id": "trace.abc-123_x", **AUTH}
    assert guarded.get("/v1/models", ours)[1]["x-request-id"] == "trace.abc-123_x"  # a client's own id is kept
    assert guarded.get("/v1/models", {"x-request-id": "bad id\t!", **AUTH})[1]["x-request-id"].startswith("req-")
    assert guarded.get("/v1/models")[1]["x-request-id"].startswith("req-")  # a 401 has one too
    wait_until(lambda: "request_id=trace.abc-123_x" in guarded.log() and f"request_id={rid}" in guarded.log())
    lines = [line for line in guarded.log().splitlines() if "diffspec.serve.access" in line]
    mine = [line for line in lines if f"request_id={rid} " in line]
    assert len(mine) == 1 and "method=POST path=/v1/completions status=200" in mine[0]
    assert "client=127.0.0.1:" in mine[0]
    assert len([line for line in lines if "request_id=trace.abc-123_x " in line]) == 1


# ---------------------------------------------------------------- aborts: disconnects and timeouts


@pytest.fixture(scope="module")
def held():
    """A server whose batches start only when full (3 rows): a collection window of 10^5 s."""
    srv = Server("--method", "vanilla", "--gen-length", "32", "--batch-window", "100000", "--max-batch", "3",
                 "--max-queue", "3")
    yield srv
    srv.stop()


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_a_client_that_leaves_the_queue_frees_its_capacity_at_once(held, model):
    before = held.health()["stats"]
    # X: a stream of 2 rows, queued (the window waits for a third row)
    conn = http.client.HTTPConnection("127.0.0.1", held.port)
    conn.request("POST", "/v1/completions", json.dumps({"model": "llada-arith", "prompt": [Q0, Q1], "stream": True}),
                 {"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    wait_until(lambda: held.health()["queue_rows"] == 2)
    two_rows = {"model": "llada-arith", "prompt": [Q1, Q0]}
    status, _, raw = held.post("/v1/completions", two_rows)
    assert status == 429 and openai_error(raw)["code"] == "queue_full"  # 2 + 2 > --max-queue 3
    conn.close()  # X hangs up while queued: its rows leave the queue now, not when a batch would take them
    wait_until(lambda: held.health()["queue_rows"] == 0)
    assert held.health()["stats"]["cancelled"] == before["cancelled"] + 1
    # the freed capacity takes a new request; a third row fills the batch, and both answers are generate's
    t_two, box_two = _in_thread(lambda: held.post("/v1/completions", two_rows))
    wait_until(lambda: held.health()["queue_rows"] == 2 or "error" in box_two)
    t_one, box_one = _in_thread(lambda: held.post("/v1/completions", {"model": "llada-arith", "prompt": Q0}))
    t_two.join()
    t_one.join()
    status_two, _, raw_two = box_two["result"]
    status_one, _, raw_one = box_one["result"]
    assert (status_two, status_one) == (200, 200), (raw_two, raw_one)
    ref0 = reference(model, Q0, method="vanilla", gen_length=32)
    ref1 = reference(model, Q1, method="vanilla", gen_length=32)
    assert [c["text"] for c in json.loads(raw_two)["choices"]] == [ref1, ref0]
    assert json.loads(raw_one)["choices"][0]["text"] == ref0
    assert json.loads(raw_one)["usage"]["diffspec"]["batch_rows"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_timeout_gets_408_and_leaves_the_queue(held, stream):
    # queued behind the held window, it cannot finish, whatever the machine's speed
    status, _, raw = held.post("/v1/completions", {"model": "llada-arith", "prompt": Q0, "timeout": 0.2,
                                                   "stream": stream})
    if stream:
        assert status == 200
        events = [json.loads(line[6:]) for line in raw.decode().splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        err = events[-1]["error"]
        assert raw.decode().rstrip().endswith("data: [DONE]")
    else:
        assert status == 408
        err = openai_error(raw)
    assert (err["code"], err["param"]) == ("request_timeout", "timeout") and "0.2 s" in err["message"]
    wait_until(lambda: held.health()["queue_rows"] == 0)


@pytest.mark.parametrize("timeout", [0, -1, "5", True, float("inf")])
def test_a_bad_timeout_is_a_400(held, timeout):
    body = json.dumps({"model": "llada-arith", "prompt": Q0, "timeout": timeout}).encode()  # inf -> Infinity
    status, _, raw = held.post("/v1/completions", body)
    err = openai_error(raw)
    assert (status, err["param"]) == (400, "timeout"), err


@pytest.mark.parametrize("method,cache,extra,stream", [
    ("vanilla", "none", {}, True),
    ("vanilla", "none", {}, False),  # a plain request's socket: checked every half second
    ("fast-dllm", "dual", {"policy": "schedule"}, True),
    ("dkv-cache", "dkv-decode", {}, True),
])
def test_a_client_that_leaves_mid_decode_leaves_the_canvas_at_the_next_step(model, method, cache, extra, stream):
    """One block of 64 cells (so a row can leave only in the middle of a block, with its cache's state
    cut down to the other rows) and 3 rows that start together. X hangs up once the batch has started; its row must leave the canvas before the batch ends,
    and the other two answers must be exactly what `generate` gives each alone. (The batch, 64 forwards of
    3 rows, runs for far longer than the server takes to notice a closed socket; that is the one ordering
    this test assumes, as test_serve.py's disconnect test does.)"""
    opts = dict(method=method, gen_length=64, block_length=64, steps=64, cache=cache, **extra)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    srv = Server(*flags, "--batch-window", "100000", "--max-batch", "3")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port)
        conn.request("POST", "/v1/completions", json.dumps({"model": "llada-arith", "prompt": QUESTIONS[2],
                                                            "stream": stream}), {"Content-Type": "application/json"})
        if stream:
            assert conn.getresponse().status == 200
        wait_until(lambda: srv.health()["queue_rows"] == 1)
        threads = [_in_thread(lambda q=q: srv.post("/v1/completions", {"model": "llada-arith", "prompt": q}))
                   for q in (Q0, Q1)]
        wait_until(lambda: srv.health()["stats"]["batches"] == 1)  # the three rows are decoding
        conn.close()
        for t, _ in threads:
            t.join()
        stats = srv.health()["stats"]
        # X's row left the canvas while the other two went on decoding (in its only block: at a step)
        assert stats["rows_left_early"] == 1 and stats["freed_rows"] == 1, stats
        for (_, box), q in zip(threads, (Q0, Q1)):
            status, _, raw = box["result"]
            assert status == 200 and json.loads(raw)["choices"][0]["text"] == reference(model, q, **opts)
    finally:
        srv.stop()


# ---------------------------------------------------------------- options are checked before loading


@pytest.mark.parametrize("args,env,words", [
    (["--api-key", ""], {}, "--api-key is empty"),
    (["--api-key", "has space"], {}, "--api-key must be printable ASCII"),
    ([], {"DIFFSPEC_API_KEY": ""}, "DIFFSPEC_API_KEY is set but empty"),
    (["--drain-timeout", "-1"], {}, "--drain-timeout must be"),
    (["--drain-timeout", "nan"], {}, "--drain-timeout must be"),
    (["--limit-n", "0"], {}, "--limit-n must be an integer >= 1"),
    (["--limit-prompt-tokens", "-5"], {}, "--limit-prompt-tokens must be"),
    (["--limit-body-bytes", "0"], {}, "--limit-body-bytes must be"),
    (["--limit-max-tokens", "16", "--gen-length", "32"], {}, "beyond --limit-max-tokens (16)"),
    (["--prompt-bucket", "0"], {}, "--prompt-bucket must be an integer >= 1"),
    (["--batching", "continuous"], {}, "--batching: invalid choice"),
])
def test_bad_production_options_are_refused_before_loading(capsys, monkeypatch, args, env, words):
    from diffspec.cli import main

    monkeypatch.delenv("DIFFSPEC_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--method", "vanilla", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffspec: error:") and words in err, err


def test_defaults_stay_safe_and_every_flag_is_in_help(capsys):
    from diffspec.cli import build_parser

    a = build_parser().parse_args(["serve"])
    assert a.host == "127.0.0.1"  # loopback unless the operator says otherwise
    assert (a.api_key, a.drain_timeout, a.limit_body_bytes, a.no_access_log) == (None, 30.0, 1 << 20, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--api-key", "--drain-timeout", "--limit-prompt-tokens", "--limit-max-tokens", "--limit-n",
                 "--limit-body-bytes", "--no-access-log", "DIFFSPEC_API_KEY"):
        assert flag in text, flag
