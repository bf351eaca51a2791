"""Load benchmark of `diffspec serve`: N concurrent clients × M streamed requests, per method.

    python benchmarks/serve/bench_serve.py --methods vanilla fast-dllm psd --clients 1 8 --requests 4 \\
        --batching static step --out benchmarks/serve-cpu

Starts a server on a free 127.0.0.1 port in this process (the bundled model, or --model), or
talks to a running one with --url (loopback addresses only). Each client sends its requests one
after another, streamed with `stream_options.include_usage`, and records the latency, the time to
the first chunk holding text, and the completion tokens the server reports. Per method and client
count it reports requests/s, completion tokens/s, p50/p99 latency and time to first chunk, the
server's batched forwards per request and rows per batch (from /health), and the accuracy of the
answers on the arith problems they came from. Bounded: N × M requests per row and a --deadline
for the whole run; it stops by itself. `--batching static step` runs every row once per server
batching mode (one in-process server each, same traffic), to compare them in one run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    def __init__(self, url: str):
        u = urlparse(url)
        if u.hostname not in LOOPBACK:
            raise SystemExit(f"refusing {url}: this benchmark only talks to loopback addresses")
        self.host, self.port = u.hostname, u.port or 80

    def get(self, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stream(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """POST a streamed completion; return timings, text, finish reason and usage."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        t0 = time.perf_counter()
        out: dict[str, Any] = {"ok": False, "text": "", "ttfc": None, "usage": None, "finish_reason": None}
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            out["status"] = r.status
            if r.status != 200:
                out["error"] = r.read().decode(errors="replace")[:300]
                return out
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    out["ok"] = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    break
                if chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        if out["ttfc"] is None:
                            out["ttfc"] = time.perf_counter() - t0
                        out["text"] += c["text"]
                    out["finish_reason"] = c.get("finish_reason") or out["finish_reason"]
        except (OSError, http.client.HTTPException) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            out["latency"] = time.perf_counter() - t0
            conn.close()
        return out


def run_row(target: Target, model_id: str, method: str, clients: int, requests: int, examples: list,
            max_tokens: int | None, deadline: float) -> dict[str, Any]:
    from diffspec.tasks import score

    results: list[dict[str, Any]] = [None] * (clients * requests)  # type: ignore[list-item]
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait(60)
        for j in range(requests):
            i = c * requests + j
            if time.monotonic() > deadline:
                results[i] = {"ok": False, "error": "deadline", "latency": 0.0}
                continue
            ex = examples[i % len(examples)]
            body = {"model": model_id, "prompt": ex.prompt, "stream": True,
                    "stream_options": {"include_usage": True}, "diffspec": {"method": method}}
            if max_tokens:
                body["max_tokens"] = max_tokens
            r = target.stream(body, timeout=max(1.0, deadline - time.monotonic()))
            r["correct"] = bool(r["ok"] and score(ex, r["text"])["correct"])
            results[i] = r

    before = target.get("/health")["stats"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = target.get("/health")["stats"]
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["usage"]["completion_tokens"] for r in ok if r["usage"])
    lat = [r["latency"] for r in ok]
    ttfc = [r["ttfc"] for r in ok if r["ttfc"] is not None]
    forwards = after["forwards"] - before["forwards"]
    batches = after["batches"] - before["batches"]
    rows = after["rows"] - before["rows"]
    return {
        "joined": after.get("joined", 0) - before.get("joined", 0),
        "method": method, "clients": clients, "requests": len(results), "ok": len(ok),
        "errors": sorted({str(r.get("error")) for r in results if not r["ok"]})[:5],
        "wall_seconds": wall, "requests_per_second": len(ok) / wall, "tokens_per_second": tokens / wall,
        "completion_tokens": tokens,
        "latency_p50": percentile(lat, 50) if lat else None, "latency_p99": percentile(lat, 99) if lat else None,
        "ttfc_p50": percentile(ttfc, 50) if ttfc else None, "ttfc_p99": percentile(ttfc, 99) if ttfc else None,
        "forwards": forwards, "forwards_per_request": forwards / max(1, len(ok)), "batches": batches,
        "rows_per_batch": rows / max(1, batches), "accuracy": sum(r["correct"] for r in results) / len(results),
        "texts": [r.get("text") if r["ok"] else None for r in results],  # request i asks examples[i % len]
    }


def same_answers(rows: list[dict[str, Any]]) -> list[str]:
    """For each row of a batching mode other than the first, how many of its answers equal the first
    mode's answers to the same requests (same method, clients and request index)."""
    first = rows[0].get("batching")
    base = {(r["method"], r["clients"]): r["texts"] for r in rows if r.get("batching") == first}
    out = []
    for r in rows:
        ref = base.get((r["method"], r["clients"]))
        if r.get("batching") == first or ref is None:
            continue
        same = sum(a is not None and a == b for a, b in zip(r["texts"], ref))
        ratio = ""
        p50 = {row.get("batching"): row["latency_p50"] for row in rows
               if (row["method"], row["clients"]) == (r["method"], r["clients"])}
        if p50.get(first) and r["latency_p50"] is not None:
            ratio = f"; p50 latency {r['latency_p50'] / p50[first]:.2f}× {first} batching's"
        out.append(f"{r['method']} at {r['clients']} clients: {same}/{len(ref)} answers with {r['batching']} batching "
                   f"equal {first} batching's{ratio}")
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | batching | clients × requests | ok | req/s | tokens/s | p50 latency (s) | p99 latency (s) | "
            "p50 first chunk (s) | p99 first chunk (s) | forwards / request | rows / batch | joined | accuracy |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        f = (lambda v: "—" if v is None else f"{v:.3f}")
        lines.append(f"| {r['method']} | {r.get('batching', 'static')} | {r['clients']} × {r['requests'] // r['clients']} | "
                     f"{r['ok']}/{r['requests']} | "
                     f"{r['requests_per_second']:.2f} | {r['tokens_per_second']:.1f} | {f(r['latency_p50'])} | "
                     f"{f(r['latency_p99'])} | {f(r['ttfc_p50'])} | {f(r['ttfc_p99'])} | "
                     f"{r['forwards_per_request']:.1f} | {r['rows_per_batch']:.1f} | {r.get('joined', 0)} | "
                     f"{r['accuracy']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["vanilla", "fast-dllm", "psd"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one row each")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    p.add_argument("--max-tokens", type=int, help="max_tokens of every request (default: the server's)")
    p.add_argument("--url", help="a running server (loopback only); default: start one in this process")
    p.add_argument("--model", help="checkpoint for the in-process server (default: the bundled model)")
    p.add_argument("--device", default="cpu", help="device of the in-process server's model (cpu, cuda; default cpu)")
    p.add_argument("--dtype", help="dtype of the in-process server's model (default: the checkpoint's loader default)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-window", type=float, default=0.02)
    p.add_argument("--batching", nargs="+", choices=("static", "step"), default=["step"],
                   help="the in-process server's batching modes, each run with the same traffic (default step)")
    p.add_argument("--deadline", type=float, default=600, help="seconds for the whole run (default 600)")
    p.add_argument("--out", help="directory for results.json and table.md")
    a = p.parse_args(argv)
    if a.requests < 1 or min(a.clients) < 1:
        p.error("--clients and --requests must be >= 1")
    deadline = time.monotonic() + a.deadline
    load_before = os.getloadavg()

    from diffspec.tasks import load_examples

    if a.url and len(a.batching) > 1:
        p.error("--batching with several modes starts its own servers; drop --url")
    examples = load_examples("arith", limit=max(a.clients) * a.requests)
    rows = []
    for mode in a.batching:
        server = None
        if a.url:
            target = Target(a.url)
        else:
            import uvicorn

            from diffspec.serve import ServeSettings, create_app

            port = free_port()
            app = create_app(ServeSettings(model=a.model, method=a.methods[0], max_batch=a.max_batch,
                                           batch_window=a.batch_window, batching=mode, device=a.device,
                                           dtype=a.dtype))
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
            threading.Thread(target=server.run, daemon=True).start()
            while not server.started:
                time.sleep(0.05)
            target = Target(f"http://127.0.0.1:{port}")
        try:
            health = target.get("/health")
            model_id = health["model"]
            for method in a.methods:
                target.stream({"model": model_id, "prompt": examples[0].prompt, "stream": True,
                               "diffspec": {"method": method}}, timeout=120)  # warm-up, not counted
                for clients in a.clients:
                    row = run_row(target, model_id, method, clients, a.requests, examples, a.max_tokens, deadline)
                    row["batching"] = health.get("batching", mode)
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
        finally:
            if server is not None:
                server.should_exit = True
    md = table(rows)
    checks = same_answers(rows)
    if checks:
        md += "\n" + "\n".join(f"- {c}" for c in checks) + "\n"
    print("\n" + md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        meta = {"command": command, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                                "python": platform.python_version()},
                "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
                "load_average_before": load_before, "load_average_after": os.getloadavg(),
                "server": {k: health.get(k) for k in ("model", "max_batch", "batch_window", "max_queue")},
                "rows": rows}
        import torch

        meta["machine"]["torch"] = torch.__version__
        meta["machine"]["torch_threads"] = torch.get_num_threads()
        (out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
        env = " ".join(f"{k}={v}" for k, v in meta["env"].items() if v is not None)
        note = (f"Command: `{(env + ' ') if env else ''}{command}`\n\n"
                f"1-minute load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on "
                f"{os.cpu_count()} cores. Accuracy is on the arith problems each row sent (clients × requests "
                "of them), so rows with different counts saw different problems. Forwards are the server's "
                "batched forwards; rows / batch is the mean canvas height; joined counts the requests that joined "
                "a running batch (step batching).\n\n")
        (out / "table.md").write_text(note + md)
        print(f"wrote {out / 'results.json'} and {out / 'table.md'}", file=sys.stderr)
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
