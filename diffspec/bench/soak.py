"""A soak of `diffspec serve`: mixed traffic against a real server process, checked request by request.

    python -m diffspec.bench.soak --minutes 10 --clients 1 4 16 --out benchmarks/serve-soak-cpu

Why: a server that answers twelve polite clients can still leak memory, crash on a body it did
not expect, or hand one client another's tokens once requests are cancelled and batched together.
This drives one server (a subprocess on a free loopback port, the bundled model unless --model)
with a bounded number of clients. Each client sends, in a seeded order, good requests (plain and
streamed, over several methods), malformed JSON, prompts over the server's token limit, bodies
over its byte limit, bad option values, and streams it hangs up on after the first chunk. Every
answer is checked against what it must be: a good answer's text equals offline `generate` with
the same method on the same model; each bad request gets its 4xx. It reports throughput, p50/p99
latency and time to first chunk per client count, every unexpected status, and the server's
resident memory after warm-up and at the end; then it sends SIGTERM and records the exit code.

`--server-args` may be given more than once: each is one server configuration (e.g. static
against step-level batching), run with the same traffic in the same process, one after another.
A run is bounded by --minutes per client count or, for tests, --requests per client count.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

# Traffic mix: kind -> weight. Good requests dominate, as they would in production.
KINDS = {"good": 4, "good_stream": 4, "malformed": 1, "too_long": 1, "too_big": 1, "bad_option": 1,
         "disconnect": 1}
EXPECTED = {"malformed": (400,), "too_long": (400,), "too_big": (413,), "bad_option": (400,)}
PROMPT_TOKEN_LIMIT, BODY_BYTE_LIMIT = 512, 32_768  # the limits the soak starts its servers with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


class ServerProcess:
    """`python -m diffspec.cli serve` on a free loopback port; stderr to a file."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("DIFFSPEC_API_KEY", None)
        cmd = [sys.executable, "-m", "diffspec.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--limit-prompt-tokens", str(PROMPT_TOKEN_LIMIT), "--limit-body-bytes", str(BODY_BYTE_LIMIT), *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self._log)
        while True:  # until it answers or dies, however long a busy machine takes to load the model
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before answering:\n"
                                   f"{log_path.read_text()[-2000:]}")
            try:
                if http_request(self.port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc), in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line in /proc/<pid>/status")

    def terminate(self) -> int:
        """SIGTERM (graceful drain), then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait()
        self._log.close()
        return code


def http_request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def stream(port: int, body: dict[str, Any], hang_up: bool = False) -> dict[str, Any]:
    """POST a streamed completion; with `hang_up`, close the connection after the first text chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"text": "", "ttft": None, "done": False, "error": None}
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        out["status"] = r.status
        if r.status != 200:
            r.read()
            return out
        while line := r.readline():
            line = line.strip()
            if line == b"data: [DONE]":
                out["done"] = True
                break
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]
                break
            for c in event.get("choices", []):
                if c.get("text"):
                    out["ttft"] = out["ttft"] if out["ttft"] is not None else time.perf_counter() - t0
                    out["text"] += c["text"]
            if hang_up and out["text"]:
                break
    finally:
        out["latency"] = time.perf_counter() - t0
        conn.close()
    return out


@dataclass
class Record:
    """One request: what was sent, what came back, and whether that was right."""

    kind: str
    method: str
    status: int
    ok: bool
    latency: float
    ttft: float | None = None
    detail: str = ""


@dataclass
class Traffic:
    """What the clients send: the model's id, good prompts, methods, and each (method, prompt)'s answer."""

    model_id: str
    prompts: list[str]
    methods: list[str]
    options: dict[str, Any]
    reference: dict[tuple[str, int], str] = field(default_factory=dict)


def send(port: int, traffic: Traffic, kind: str, rng: random.Random) -> Record:
    """One request of `kind`, checked."""
    method = rng.choice(traffic.methods)
    i = rng.randrange(len(traffic.prompts))
    body = {"model": traffic.model_id, "prompt": traffic.prompts[i],
            "diffspec": {"method": method, **traffic.options}}
    t0 = time.perf_counter()
    if kind in ("good_stream", "disconnect"):
        r = stream(port, body, hang_up=kind == "disconnect")
        want = traffic.reference[(method, i)]
        if kind == "disconnect":  # what arrived before the hang-up must be a prefix of the answer
            ok = r["status"] == 200 and want.startswith(r["text"])
        else:
            ok = r["status"] == 200 and r["done"] and r["error"] is None and r["text"] == want
        return Record(kind, method, r["status"], ok, r["latency"], r["ttft"], "" if ok else repr(r)[:300])
    if kind == "good":
        raw = json.dumps(body).encode()
    elif kind == "malformed":
        raw = json.dumps(body).encode()[:-7]  # cut mid-object
    elif kind == "too_long":
        raw = json.dumps({**body, "prompt": "1 + 2 = 3. " * PROMPT_TOKEN_LIMIT}).encode()
    elif kind == "too_big":
        raw = json.dumps({**body, "prompt": "x" * (2 * BODY_BYTE_LIMIT)}).encode()
    elif kind == "bad_option":
        raw = json.dumps({**body, "diffspec": {"method": method, "threshold": 7.5}}).encode()
    else:
        raise ValueError(f"unknown traffic kind {kind!r}; choose one of {', '.join(KINDS)}")
    status, resp = http_request(port, "POST", "/v1/completions", raw)
    latency = time.perf_counter() - t0
    if kind == "good":
        text = json.loads(resp)["choices"][0]["text"] if status == 200 else None
        ok = text == traffic.reference[(method, i)]
    else:
        ok = status in EXPECTED[kind] and "error" in json.loads(resp)
    return Record(kind, method, status, ok, latency, None, "" if ok else resp[:300].decode(errors="replace"))


def schedule(n: int, rng: random.Random) -> list[str]:
    """`n` kinds in a seeded order that holds every kind once the run is long enough (whole rounds first)."""
    bag = [k for k, w in KINDS.items() for _ in range(w)]
    out: list[str] = []
    while len(out) < n:
        rng.shuffle(bag)
        out += bag
    return out[:n]


def run_phase(port: int, traffic: Traffic, clients: int, seed: int, requests: int | None,
              seconds: float | None, bar: tqdm) -> tuple[list[Record], float]:
    """`clients` concurrent clients, each sending `requests` requests or until `seconds` pass."""
    records: list[Record] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds if seconds else None

    def client(c: int) -> None:
        rng = random.Random(f"soak-{seed}-{clients}-{c}")
        kinds = schedule(requests if requests else 10_000, rng)
        for kind in kinds:
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            rec = send(port, traffic, kind, rng)
            with lock:
                records.append(rec)
                bar.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))  # a client that raises fails the phase, not silently
    return records, time.perf_counter() - t0


def summarize(records: list[Record], wall: float, clients: int) -> dict[str, Any]:
    good = [r for r in records if r.kind in ("good", "good_stream")]
    streams = [r.ttft for r in records if r.kind == "good_stream" and r.ttft is not None]
    lat = [r.latency for r in good]
    return {
        "clients": clients, "requests": len(records), "wall_seconds": wall,
        "by_kind": {k: sum(r.kind == k for r in records) for k in KINDS},
        "good": len(good), "good_exact": sum(r.ok for r in good),
        "wrong": sum(not r.ok for r in records), "server_errors": sum(r.status >= 500 for r in records),
        "good_per_second": len(good) / wall if wall else 0.0,
        "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
        "ttft_p50": percentile(streams, 50), "ttft_p99": percentile(streams, 99),
        "failures": [asdict(r) for r in records if not r.ok][:10],
    }


def build_traffic(model: str | None, methods: list[str], n_prompts: int, options: dict[str, Any]) -> Traffic:
    """Good prompts (held-out arith questions) and their offline answers, one `generate` per method."""
    from diffspec.api import generate, resolve_model
    from diffspec.tasks import load_examples

    prompts = [e.prompt for e in load_examples("arith", limit=n_prompts)]
    m, tok = resolve_model(model, None, "cpu", None, method=methods[0])
    traffic = Traffic(model_id="", prompts=prompts, methods=methods, options=options)
    for method in tqdm(methods, desc="offline answers", leave=False):
        texts = generate(prompts, model=m, tokenizer=tok, method=method, **options).texts
        traffic.reference.update({(method, i): t for i, t in enumerate(texts)})
    return traffic


def warm_up(port: int, traffic: Traffic, width: int) -> None:
    """Each method `width` times at once before memory is first read: the server's allocator reaches
    the high-water mark of a full batch (issue #38: from a one-request warm-up, resident memory grew
    9.7 % static and 19.1 % step-batched under steady traffic that later stayed flat), so the growth
    measured afterwards is what a leak would add, not the first full batch's working set."""
    for method in traffic.methods:
        one = replace(traffic, methods=[method])
        with ThreadPoolExecutor(max_workers=width) as pool:
            done = list(pool.map(lambda i: send(port, one, "good", random.Random(i)), range(width)))
        failed = [r for r in done if not r.ok]
        if failed:
            raise RuntimeError(f"a warm-up request for {method} failed: {failed[0].detail}")


def soak(server_args: list[str], traffic: Traffic, clients: list[int], requests: int | None,
         seconds: float | None, seed: int, log_path: Path) -> dict[str, Any]:
    """One server configuration through every client count; memory after a warm-up at the widest
    client count (`warm_up`) and at the end."""
    srv = ServerProcess(server_args, log_path)
    try:
        traffic.model_id = json.loads(http_request(srv.port, "GET", "/health")[1])["model"]
        warm_up(srv.port, traffic, max(clients))  # not counted
        rss_start = srv.rss_mb()
        phases = []
        total = requests * sum(clients) if requests else None
        with tqdm(total=total, desc="soak " + (" ".join(server_args) or "(defaults)"), unit="req") as bar:
            for n in clients:
                records, wall = run_phase(srv.port, traffic, n, seed, requests, seconds, bar)
                phases.append({**summarize(records, wall, n), "rss_mb": srv.rss_mb()})
        rss_end = srv.rss_mb()
    except BaseException:
        srv.proc.kill()
        raise
    exit_code = srv.terminate()
    return {"server_args": server_args, "phases": phases, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
            "rss_growth": rss_end / rss_start - 1, "exit_code_after_sigterm": exit_code}


def table(runs: list[dict[str, Any]]) -> str:
    f: Callable[[float | None], str] = lambda v: "—" if v is None else f"{v:.2f}"
    lines = ["| server | clients | requests | good exact | wrong | 5xx | good req/s | p50 latency (s) | "
             "p99 latency (s) | p50 first chunk (s) | p99 first chunk (s) | RSS after (MiB) |", "|" + "---|" * 12]
    for run in runs:
        name = " ".join(run["server_args"]) or "defaults"
        for p in run["phases"]:
            lines.append(f"| {name} | {p['clients']} | {p['requests']} | {p['good_exact']}/{p['good']} | {p['wrong']} | "
                         f"{p['server_errors']} | {p['good_per_second']:.2f} | {f(p['latency_p50'])} | "
                         f"{f(p['latency_p99'])} | {f(p['ttft_p50'])} | {f(p['ttft_p99'])} | "
                         f"{p['rss_mb']:.0f} |")
    lines += ["", "| server | RSS after warm-up (MiB) | RSS at end (MiB) | growth | exit code after SIGTERM |",
              "|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {' '.join(run['server_args']) or 'defaults'} | {run['rss_start_mb']:.0f} | "
                     f"{run['rss_end_mb']:.0f} | {run['rss_growth']:+.1%} | {run['exit_code_after_sigterm']} |")
    return "\n".join(lines) + "\n"


def passed(runs: list[dict[str, Any]], max_rss_growth: float) -> bool:
    return all(r["exit_code_after_sigterm"] == 0 and r["rss_growth"] <= max_rss_growth
               and all(p["wrong"] == 0 and p["server_errors"] == 0 for p in r["phases"]) for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-args", action="append", default=None,
                   help="one server configuration as a shell string (repeatable); default: the defaults")
    p.add_argument("--methods", nargs="+", default=["vanilla", "fast-dllm", "psd"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="client counts, one phase each")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--minutes", type=float, help="minutes per server configuration, split over the phases")
    bound.add_argument("--requests", type=int, help="requests per client in each phase (default 8)")
    p.add_argument("--prompts", type=int, default=8, help="distinct good prompts (default 8)")
    p.add_argument("--gen-length", type=int, help="gen_length of every good request (default: each method's)")
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth (default 0.10)")
    p.add_argument("--out", help="directory for results.json and table.md")
    a = p.parse_args(argv)
    if min(a.clients) < 1 or a.prompts < 1 or (a.requests is not None and a.requests < 1) or \
            (a.minutes is not None and a.minutes <= 0):
        p.error("--clients, --prompts and --requests must be >= 1, --minutes > 0")
    requests = None if a.minutes else (a.requests or 8)
    seconds = a.minutes * 60 / len(a.clients) if a.minutes else None
    options = {"gen_length": a.gen_length} if a.gen_length else {}
    traffic = build_traffic(a.model, a.methods, a.prompts, options)
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="diffspec-soak-"))  # server logs: large, kept out of --out
    print(f"server logs in {log_dir}", file=sys.stderr)
    runs = []
    for i, args in enumerate(a.server_args or [""]):
        server_args = shlex.split(args) + (["--model", a.model] if a.model else [])
        runs.append(soak(server_args, traffic, a.clients, requests, seconds, a.seed,
                         log_dir / f"server-{i}.log"))
    md = table(runs)
    print(md)
    ok = passed(runs, a.max_rss_growth)
    if out:
        command = "python -m diffspec.bench.soak " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        (out / "results.json").write_text(json.dumps(
            {"command": command, "cores": os.cpu_count(), "loadavg_end": os.getloadavg(), "passed": ok,
             "methods": a.methods, "runs": runs}, indent=2) + "\n")
        (out / "table.md").write_text(f"Command: `{command}`\n\n{md}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
