"""`GET /metrics`: the server's state in Prometheus text format (`prometheus-client`).

Each app has its own registry (several apps in one process, as in the tests, never share
counters). What the HTTP layer sees (requests by endpoint and status code, per-request latency,
time to first token, requests in flight) is recorded as it happens; what the engine counts
(`EngineStats`: tokens generated, forwards, batches, rows, …) and its live state (queued and
running rows) is read at scrape time, so `/metrics` and `/health` never disagree.
"""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds: a small CPU model answers in tens of milliseconds alone and in tens of seconds under load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "endpoint_label"]


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (unknown paths share one label, so a scan cannot blow up the series)."""
    if path.startswith("/v1/models"):
        return "/v1/models"
    return path if path in ENDPOINTS else "other"


class _EngineCollector:
    """The engine's counters and gauges, read when /metrics is scraped."""

    COUNTERS = (
        ("requests_admitted", "requests", "Requests queued for decoding"),
        ("requests_rejected", "rejected", "Requests refused with 429 because the queue was full"),
        ("requests_cancelled", "cancelled", "Queued requests whose client left before they were decoded"),
        ("decode_errors", "errors", "Requests whose decoding failed"),
        ("batches", "batches", "Batches started"),
        ("requests_joined", "joined", "Requests that joined a running batch at a block start (step-level batching)"),
        ("rows", "rows", "Canvas rows decoded"),
        ("freed_rows", "freed_rows", "Rows that stopped being decoded early because their client left or their "
         "request's timeout passed"),
        ("rows_left_early", "rows_left_early", "Freed rows taken out of a running canvas while its other rows "
         "went on decoding"),
        ("forwards", "forwards", "Model forwards (every model of a method: target, drafters, verifier)"),
        ("tokens_generated", "tokens_generated",
         "Tokens generated: each decoded row's answer through its first EOS (included) or stop string"),
        ("busy_seconds", "busy_seconds", "Seconds the engine's worker spent decoding"),
    )

    def __init__(self, service: Any, gate: Any):
        self.service, self.gate = service, gate

    def collect(self) -> Iterator[Any]:
        engine = self.service.engine
        stats = engine.stats
        for name, attr, doc in self.COUNTERS:
            yield CounterMetricFamily(f"diffspec_{name}", doc, value=getattr(stats, attr))
        yield GaugeMetricFamily("diffspec_queue_rows", "Rows waiting in the queue", value=engine.queue_depth())
        yield GaugeMetricFamily("diffspec_running_rows", "Rows of the batch being decoded whose answers are not done",
                                value=engine.running_rows())
        yield GaugeMetricFamily("diffspec_max_queue_rows", "The queue's capacity in rows (--max-queue)",
                                value=engine.max_queue)
        yield GaugeMetricFamily("diffspec_requests_in_flight", "HTTP requests being answered",
                                value=self.gate.in_flight if self.gate is not None else 0)
        yield GaugeMetricFamily("diffspec_draining", "1 once SIGTERM was received (new requests get 503)",
                                value=1 if self.service.draining else 0)


class Metrics:
    """The app's registry and the metrics the HTTP layer records."""

    def __init__(self, service: Any):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("diffspec_http_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("diffspec_request_latency_seconds",
                                 "Seconds from a request's arrival to the end of its response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("diffspec_time_to_first_token_seconds",
                              "Seconds from a completion request's arrival to its first text (or its end, for an "
                              "empty answer)", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.service = service
        self._collector: _EngineCollector | None = None

    def attach(self, gate: Any) -> None:
        """Register the engine collector (once the HTTP gate that counts requests in flight exists)."""
        if self._collector is None:
            self._collector = _EngineCollector(self.service, gate)
            self.registry.register(self._collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
