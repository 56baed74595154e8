"""`GET /metrics`: the engine's counters and the server's own, through prometheus_client.

The server's own series (HTTP answers by route and status, time to first token) are prometheus_client
metrics; the engine's are read from it at each scrape (a collector), so that the engine counts without
knowing about Prometheus. Each server has a registry of its own: two in one process never mix. The format
follows the scraper's Accept header (Prometheus text 0.0.4 by default, OpenMetrics when asked for).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The registry of one server, for model `model`: `response` and `ttft` count as requests end; `engine` is read
    at each scrape once the model has loaded."""

    def __init__(self, model: str = "llama"):
        self.model = model
        self.engine = None  # absent while the model loads: its series are then absent too
        self.registry = CollectorRegistry(auto_describe=True)
        self._responses = Counter("llama_http_responses", "API answers by path and HTTP status.", ["path", "status"],
                                  registry=self.registry)
        self._ttft = Histogram("llama_time_to_first_token_seconds",
                               "Seconds from a request's arrival to its first token.", ["model"],
                               buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(self))

    def response(self, path: str, status: int) -> None:
        self._responses.labels(path, str(status)).inc()

    def ttft(self, seconds: Optional[float]) -> None:
        if seconds is not None:  # None: no token came (max_tokens 0, or it ended before one)
            self._ttft.labels(self.model).observe(seconds)

    def render(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """The exposition for a scraper that sent `accept`, and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _EngineCollector:
    """The engine's counters and gauges, read from `Engine.stats` and `Engine.pending()` at each scrape."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # only known once the model is loaded

    def collect(self) -> Iterator[Metric]:
        engine, model = self._metrics.engine, self._metrics.model
        if engine is None:
            return
        s = engine.stats
        waiting, running = engine.pending()
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        for kind, name, help_, value in (
            (counter, "llama_requests_submitted", "Requests the engine accepted.", s.requests_submitted),
            (counter, "llama_requests_finished", "Requests that ended, for any reason.", s.requests_finished),
            (counter, "llama_prompt_tokens", "Prompt tokens of accepted requests.", s.prompt_tokens),
            (counter, "llama_prompt_tokens_cached", "Prompt tokens taken from the prefix cache.",
             s.prompt_tokens_cached),
            (counter, "llama_prompt_tokens_computed", "Prompt tokens run through the model (recomputed ones included).",
             s.prompt_tokens_computed),
            (counter, "llama_preemptions", "Requests preempted for want of KV-cache blocks.", s.preemptions),
            (counter, "llama_generation_tokens", "Tokens generated.", s.generated_tokens),
            (counter, "llama_engine_steps", "Engine steps (one batched forward each).", s.steps),
            (gauge, "llama_requests_waiting", "Requests waiting to start (the queue).", waiting),
            (gauge, "llama_requests_running", "Requests running (the batch's rows).", running),
            (gauge, "llama_slots", "Requests that run at once at most (max_batch_size).", engine.max_batch_size),
            (gauge, "llama_kv_cache_blocks", "KV-cache blocks.", s.kv_blocks),
            (gauge, "llama_kv_cache_blocks_used", "KV-cache blocks held by running requests.", s.kv_blocks_used),
            (gauge, "llama_kv_cache_blocks_cached", "KV-cache blocks holding a cached prefix.", s.kv_blocks_cached),
        ):
            family = kind(name, help_, labels=["model"])
            family.add_metric([model], value)
            yield family
