"""`GET /metrics`: the engine's counters and the server's own, in Prometheus' text format (0.0.4)."""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import List, Optional

from llama.engine import Engine

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """What the engine does not count: HTTP answers by path and status, and a cumulative histogram of
    time to first token (the engine keeps only its recent TTFTs)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.responses: Counter = Counter()  # (path, status)
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0

    def response(self, path: str, status: int) -> None:
        with self._lock:
            self.responses[(path, status)] += 1

    def ttft(self, seconds: Optional[float]) -> None:
        if seconds is None:  # no token came (max_tokens 0, or it ended before one)
            return
        with self._lock:
            self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self._ttft_sum += seconds

    def render(self, engine: Optional[Engine], model: str) -> str:
        """The exposition text; the engine's series are absent while the model loads."""
        out: List[str] = []
        label = f'model="{_escape(model)}"'
        if engine is not None:
            s = engine.stats
            waiting, running = engine.pending()
            for name, kind, help_, value in (
                ("llama_requests_submitted_total", "counter", "Requests the engine accepted.", s.requests_submitted),
                ("llama_requests_finished_total", "counter", "Requests that ended, for any reason.",
                 s.requests_finished),
                ("llama_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", s.prompt_tokens),
                ("llama_prompt_tokens_cached_total", "counter", "Prompt tokens taken from the prefix cache.",
                 s.prompt_tokens_cached),
                ("llama_prompt_tokens_computed_total", "counter",
                 "Prompt tokens run through the model (recomputed ones included).", s.prompt_tokens_computed),
                ("llama_preemptions_total", "counter", "Requests preempted for want of KV-cache blocks.",
                 s.preemptions),
                ("llama_generation_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
                ("llama_engine_steps_total", "counter", "Engine steps (one batched forward each).", s.steps),
                ("llama_requests_waiting", "gauge", "Requests waiting to start (the queue).", waiting),
                ("llama_requests_running", "gauge", "Requests running (the batch's rows).", running),
                ("llama_slots", "gauge", "Requests that run at once at most (max_batch_size).", engine.max_batch_size),
                ("llama_kv_cache_blocks", "gauge", "KV-cache blocks.", s.kv_blocks),
                ("llama_kv_cache_blocks_used", "gauge", "KV-cache blocks held by running requests.", s.kv_blocks_used),
                ("llama_kv_cache_blocks_cached", "gauge", "KV-cache blocks holding a cached prefix.",
                 s.kv_blocks_cached),
            ):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
        with self._lock:
            responses = sorted(self.responses.items())
            counts, total = list(self._ttft_counts), self._ttft_sum
        out += ["# HELP llama_http_responses_total API answers by path and HTTP status.",
                "# TYPE llama_http_responses_total counter"]
        out += [f'llama_http_responses_total{{path="{_escape(p)}",status="{code}"}} {n}' for (p, code), n in responses]
        out += _histogram("llama_time_to_first_token_seconds", "Seconds from a request's arrival to its first token.",
                          counts, total, label)
        return "\n".join(out) + "\n"


def _histogram(name: str, help_: str, counts: List[int], total: float, label: str) -> List[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    running = 0
    for bound, n in zip(TTFT_BUCKETS + (float("inf"),), counts):
        running += n
        le = "+Inf" if bound == float("inf") else repr(bound)
        out.append(f'{name}_bucket{{{label},le="{le}"}} {running}')
    out += [f"{name}_sum{{{label}}} {total}", f"{name}_count{{{label}}} {running}"]
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

