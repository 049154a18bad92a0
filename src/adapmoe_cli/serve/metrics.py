"""`GET /metrics`: the server's and the runtime's counters in Prometheus' text format (prometheus_client
renders it), read when scraped: requests, tokens, the queue, and the expert cache's hits, misses, loads,
bytes read and stall time since the server started."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from adapmoe_cli.serve.worker import Worker


class _Collector:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        c, s, w = self.worker.counters, self.worker.engine.stats, self.worker
        counters = [
            ("requests", "requests answered (whole or cancelled)", c.requests),
            ("requests_cancelled", "requests whose client went away", c.cancelled),
            ("requests_failed", "requests that failed on the runtime", c.failed),
            ("requests_rejected", "requests turned away because the queue was full (429)", c.rejected),
            ("prompt_tokens", "prompt tokens of answered requests", c.prompt_tokens),
            ("completion_tokens", "tokens generated", c.completion_tokens),
            ("prompt_tokens_reused", "prompt tokens whose KV cache came from the previous request", c.reused_tokens),
            ("busy_seconds", "time the runtime spent on requests", c.busy_s),
            ("model_tokens", "tokens through the model (prompt and generated)", s.tokens),
            ("expert_uses", "experts needed by layer calls", s.expert_uses),
            ("expert_hits", "needed experts already cached", s.hits),
            ("expert_prefetch_hits", "needed experts a prefetch brought", s.prefetch_hits),
            ("expert_misses", "needed experts loaded on demand", s.misses),
            ("expert_loads", "expert reads completed", s.loads),
            ("expert_bytes_read", "bytes of experts read", s.bytes_read),
            ("expert_stall_seconds", "time the compute waited for expert reads", s.stall_s),
            ("prefetches_wasted", "prefetched experts the layer then did not need", s.wasted_prefetches),
        ]
        gauges = [
            ("requests_waiting", "requests in the queue", w.waiting),
            ("requests_running", "requests on the runtime now (0 or 1)", int(w.running)),
            ("expert_hit_rate", "hits and prefetch hits over uses since the start", s.hit_rate),
            ("experts_per_token", "experts computed per token and MoE layer since the start", s.experts_per_token),
        ]
        for kind, rows in ((CounterMetricFamily, counters), (GaugeMetricFamily, gauges)):
            for name, doc, value in rows:
                metric = kind(f"adapmoe_{name}", doc)
                metric.add_metric([], value)
                yield metric


def exposition(worker: Worker) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(worker))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
