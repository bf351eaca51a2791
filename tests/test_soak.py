"""A short soak of a real `diffspec serve` process (issue #38): mixed traffic, every answer checked.

The benchmark (`python -m diffspec.bench.soak --minutes 10`, benchmarks/serve-soak-cpu) runs the
same code for minutes; here each client sends one whole round of the traffic mix (13 requests:
good plain and streamed over two methods, malformed JSON, prompts over the token limit, bodies
over the byte limit, bad option values, hang-ups after the first chunk). Bounded by request
counts, never by time.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
from tqdm import tqdm

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from diffspec.bench import soak  # noqa: E402

ROUND = sum(soak.KINDS.values())  # one whole shuffled bag of kinds per client


@pytest.fixture(scope="module")
def traffic():
    return soak.build_traffic(None, ["vanilla", "fast-dllm"], 4, {"gen_length": 32})


@pytest.fixture(scope="module", params=["static", "step"])
def server(request, tmp_path_factory):
    """A server per batching mode: with step, requests of the mix join running batches."""
    srv = soak.ServerProcess(["--batching", request.param], tmp_path_factory.mktemp("soak") / "server.log")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def test_mixed_traffic_every_answer_right_no_5xx_memory_flat(server, traffic):
    import json

    traffic.model_id = json.loads(soak.http_request(server.port, "GET", "/health")[1])["model"]
    soak.warm_up(server.port, traffic, 3)  # as the benchmark does: every method at the widest client count
    rss_start = server.rss_mb()
    phases = []
    with tqdm(disable=True) as bar:
        for clients in (1, 3):
            records, wall = soak.run_phase(server.port, traffic, clients, 0, ROUND, None, bar)
            phases.append(soak.summarize(records, wall, clients))
    for p in phases:
        assert p["requests"] == ROUND * p["clients"]
        assert all(p["by_kind"][k] >= p["clients"] * w for k, w in soak.KINDS.items())  # every kind was sent
        assert p["wrong"] == 0 and p["server_errors"] == 0, p["failures"]
        assert p["good_exact"] == p["good"] > 0
    # Stated bound for a short soak: resident memory grows by less than a quarter after warm-up
    # (the 10-minute benchmark's target is 10 %).
    assert server.rss_mb() < 1.25 * rss_start


def test_a_wrong_answer_or_status_is_reported(server, traffic):
    """The checks are not vacuous: a reference that differs from the server's answer is a failure, and so
    is a bad request the server would accept."""
    import json

    traffic.model_id = json.loads(soak.http_request(server.port, "GET", "/health")[1])["model"]
    wrong = replace(traffic, methods=["vanilla"],
                    reference={k: v + " (not what the server says)" for k, v in traffic.reference.items()})
    for kind in ("good", "good_stream"):
        rec = soak.send(server.port, wrong, kind, random.Random(1))
        assert rec.status == 200 and not rec.ok
    rec = soak.send(server.port, traffic, "bad_option", random.Random(2))
    assert rec.status == 400 and rec.ok
    with pytest.raises(ValueError, match="unknown traffic kind"):
        soak.send(server.port, traffic, "polite", random.Random(3))


def test_sigterm_drains_and_exits_zero(server):
    assert server.terminate() == 0


def test_schedule_holds_every_kind_in_each_round():
    kinds = soak.schedule(2 * ROUND, random.Random(0))
    for half in (kinds[:ROUND], kinds[ROUND:]):
        assert sorted(half) == sorted(k for k, w in soak.KINDS.items() for _ in range(w))
    assert soak.percentile([], 50) is None and soak.percentile([3.0, 1.0, 2.0], 50) == 2.0


@pytest.mark.parametrize("argv", [["--clients", "0"], ["--prompts", "0"], ["--requests", "0"], ["--minutes", "0"],
                                  ["--minutes", "1", "--requests", "2"]])
def test_bad_soak_options_are_refused_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        soak.main(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err
