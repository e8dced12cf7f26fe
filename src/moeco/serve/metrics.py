"""The server's Prometheus metrics (`GET /metrics`), named after vLLM's so dashboards carry over.

Engine state, read from the engine thread's latest snapshot at scrape time:
    moeco:num_requests_running / moeco:num_requests_waiting         gauges
    moeco:cache_usage_perc                 fraction of latent-cache blocks in use (0..1)
    moeco:cache_free_blocks / moeco:cache_total_blocks
    moeco:prefix_cache_hit_rate            prompt tokens found in the prefix cache / prompt tokens
    moeco:spec_decode_acceptance_rate      accepted / proposed MTP draft tokens (NaN when not speculating)
    moeco:num_preemptions_total            counter
Per request, observed when it finishes:
    moeco:time_to_first_token_seconds      histogram: arrival at the server -> first token out of the engine
    moeco:time_per_output_token_seconds    histogram: (last token - first token) / (output tokens - 1)
    moeco:e2e_request_latency_seconds      histogram: arrival -> finish
    moeco:prompt_tokens_total / moeco:generation_tokens_total      counters
    moeco:request_success_total{finished_reason="stop|length|abort|error"}

Each server owns its registry (no process-global state), so tests can run several in one process.
"""

from __future__ import annotations

import math
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_GAUGES = (  # (metric, engine stats key, help)
    ("moeco:num_requests_running", "running", "Requests in the engine's running batch."),
    ("moeco:num_requests_waiting", "waiting", "Requests waiting to be admitted."),
    ("moeco:cache_usage_perc", "cache_usage", "Fraction of the latent cache's blocks in use (0..1)."),
    ("moeco:cache_free_blocks", "free_blocks", "Free blocks in the latent cache."),
    ("moeco:cache_total_blocks", "total_blocks", "Blocks in the latent cache."),
    ("moeco:prefix_cache_hit_rate", "prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens."),
    ("moeco:spec_decode_acceptance_rate", "spec_acceptance_rate", "Accepted / proposed MTP draft tokens."),
)


class _EngineCollector:
    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        stats = self.snapshot()
        for name, key, doc in _GAUGES:
            value = stats.get(key)
            yield GaugeMetricFamily(name, doc, value=math.nan if value is None else float(value))
        yield CounterMetricFamily("moeco:num_preemptions", "Sequences preempted (recomputed later).",
                                  value=float(stats.get("num_preemptions", 0)))


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict], model_name: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        r.register(_EngineCollector(snapshot))
        labels = ["model_name"]
        self.ttft = Histogram("moeco:time_to_first_token_seconds", "Arrival to first output token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("moeco:time_per_output_token_seconds",
                              "Per request: (last token - first token) / (output tokens - 1).", labels,
                              buckets=_TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("moeco:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("moeco:prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("moeco:generation_tokens", "Generated tokens.", labels,
                                         registry=r).labels(model_name)
        self._success = Counter("moeco:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        for reason in ("stop", "length", "abort", "error"):  # present at 0 from the start
            self._success.labels(model_name, reason)

    def request_finished(self, reason: str, arrival: float, first: float | None, last: float | None,
                         num_output_tokens: int, now: float) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.e2e.observe(now - arrival)
        if first is not None:
            self.ttft.observe(first - arrival)
            if num_output_tokens > 1 and last is not None:
                self.tpot.observe((last - first) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
