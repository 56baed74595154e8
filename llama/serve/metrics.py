"""`GET /metrics`: the engines' counters and the server's own, through prometheus_client.

The server's own series (HTTP answers by route and status, time to first token by model) are
prometheus_client metrics; each loaded model's engine series, and every model's state and loads, are
read at each scrape (a collector), so that the engine and the pool count without knowing about
Prometheus. Every engine series has a `model` label. Each server has a registry of its own: two in one process never mix. The format
follows the scraper's Accept header (Prometheus text 0.0.4 by default, OpenMetrics when asked for).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The registry of one server, whose models are `pool`'s (a llama.pool.ModelPool): `response` and `ttft`
    count as requests end; the loaded models' engines are read at each scrape."""

    def __init__(self, pool=None):
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
        self._responses = Counter("llama_http_responses", "API answers by path and HTTP status.", ["path", "status"],
                                  registry=self.registry)
        self._ttft = Histogram("llama_time_to_first_token_seconds",
                               "Seconds from a request's arrival to its first token.", ["model"],
                               buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(self))

    def response(self, path: str, status: int) -> None:
        self._responses.labels(path, str(status)).inc()

    def ttft(self, model: str, seconds: Optional[float]) -> None:
        if seconds is not None:  # None: no token came (max_tokens 0, or it ended before one)
            self._ttft.labels(model).observe(seconds)

    def render(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """The exposition for a scraper that sent `accept`, and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _EngineCollector:
    """Each loaded model's engine counters and gauges, read from `Engine.stats` and `Engine.pending()`, and each
    model's state and loads from the pool, at each scrape."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # only known once a model is loaded

    def collect(self) -> Iterator[Metric]:
        pool = self._metrics.pool
        if pool is None:
            return
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        loaded = gauge("llama_model_loaded", "1 for a model loaded now, 0 for one that is not.", labels=["model"])
        loads = counter("llama_model_loads", "Times a model was loaded.", labels=["model"])
        load_s = gauge("llama_model_load_seconds", "Seconds the last load of a model took.", labels=["model"])
        for name, status in pool.status().items():
            loaded.add_metric([name], 1 if status["state"] == "loaded" else 0)
            loads.add_metric([name], status["loads"])
            if status["load_s"] is not None:
                load_s.add_metric([name], status["load_s"])
        yield from (loaded, loads, load_s)
        families: dict = {}
        for model, generator in pool.loaded().items():
            engine = generator.engine
            s = engine.stats
            waiting, running = engine.pending()
            for kind, name, help_, value in (
                (counter, "llama_requests_submitted", "Requests the engine accepted.", s.requests_submitted),
                (counter, "llama_requests_finished", "Requests that ended, for any reason.", s.requests_finished),
                (counter, "llama_prompt_tokens", "Prompt tokens of accepted requests.", s.prompt_tokens),
                (counter, "llama_prompt_tokens_cached", "Prompt tokens taken from the prefix cache.",
                 s.prompt_tokens_cached),
                (counter, "llama_prompt_tokens_computed",
                 "Prompt tokens run through the model (recomputed ones included).", s.prompt_tokens_computed),
                (counter, "llama_preemptions", "Requests preempted for want of KV-cache blocks.", s.preemptions),
                (counter, "llama_generation_tokens", "Tokens generated.", s.generated_tokens),
                (counter, "llama_engine_steps", "Engine steps (one batched forward each).", s.steps),
                (gauge, "llama_requests_waiting", "Requests waiting to start (the queue).", waiting),
                (gauge, "llama_requests_running", "Requests running (the batch's rows).", running),
                (gauge, "llama_slots", "Requests that run at once at most (max_batch_size).", engine.max_batch_size),
                (gauge, "llama_kv_cache_blocks", "KV-cache blocks.", s.kv_blocks),
                (gauge, "llama_kv_cache_blocks_used", "KV-cache blocks held by running requests.", s.kv_blocks_used),
                (gauge, "llama_kv_cache_blocks_cached", "KV-cache blocks holding a cached prefix.",
                 s.kv_blocks_cached),
            ):
                if name not in families:
                    families[name] = kind(name, help_, labels=["model"])
                families[name].add_metric([model], value)
        yield from families.values()
