"""The model behind the server: loading, the engine's thread, admission, and stopping.

Every request, from the API or the page, is admitted here: refused with 503 while the model loads
or after a stop, with 429 when `max_queue` requests already wait for a slot, with 400 for what the
engine refuses; else submitted to the one engine, so concurrent users share its batches.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Callable, List, Optional

from llama.engine import EngineStopped, QueueFull
from llama.generation import Completion, Llama
from llama.serve.errors import APIError, invalid
from llama.serve.metrics import Metrics
from llama.serve.params import Sampling
from llama.serve.watch import Watch

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 or 503 asks the client to wait
# A stream's chunks come at most this often (watch.Pump): 50 a second reads as smooth, and for a small model
# it keeps the event loop from slowing the engine's steps. Steps slower than this stream every token.
STREAM_INTERVAL_S = 0.02


class Service:
    """One model served: `start` it once loaded, `watch` requests, `stop` it. `failure` is set when the
    engine's thread died (a rank gone, a bug): then every request is refused and the server goes down."""

    def __init__(self, model_name: str, max_seq_len: int, max_queue: int = 256,
                 stream_interval: float = STREAM_INTERVAL_S):
        self.model_name = model_name
        self.max_seq_len = max_seq_len  # as configured: known before the model is
        self.max_queue = max_queue
        self.stream_interval = stream_interval  # seconds between a stream's chunks, at least (see watch.Pump)
        self.created = int(time.time())
        self.llama: Optional[Llama] = None  # None while loading, and until its engine serves
        self._loaded: Optional[Llama] = None
        self.metrics = Metrics(model_name)
        self.failure: Optional[BaseException] = None  # why the engine stopped on its own
        self.stopping = False
        self.on_failure: List[Callable[[], None]] = []  # e.g. ending the HTTP server
        self._engine_thread: Optional[threading.Thread] = None
        self._watches: "weakref.WeakSet[Watch]" = weakref.WeakSet()  # what is in flight
        self._watches_lock = threading.Lock()  # added to from the loop, read from the engine's thread

    @property
    def ready(self) -> bool:
        return self.llama is not None and not self.stopping and self.failure is None

    def start(self, llama: Llama) -> None:
        """The model is loaded: run its engine in a thread of its own, and take requests once it serves
        them (before, a request would run the ranks' agreement on the event loop's thread, against the
        other ranks' step broadcast)."""
        self._loaded = llama
        serving = threading.Event()
        self._engine_thread = threading.Thread(target=self._serve, args=(llama, serving.set), name="llama-engine",
                                               daemon=True)
        self._engine_thread.start()
        while not serving.wait(timeout=0.1):
            if self.failure is not None or self.stopping:
                return
        self.metrics.engine = llama.engine
        self.llama = llama

    def _serve(self, llama: Llama, on_ready) -> None:
        try:
            llama.serve_forever(on_ready=on_ready)
        except BaseException as e:  # noqa: BLE001 - a step failed under model parallelism (a rank died), or a bug
            self.failure = e
            log.error("the engine stopped: %s: %s; the requests in flight got an error", type(e).__name__, e)
            with self._watches_lock:
                watches = list(self._watches)
            for watch in watches:  # the engine may have left them open
                try:
                    watch.pump.loop.call_soon_threadsafe(watch.fail, e)
                except RuntimeError:  # that loop is closed
                    pass
            for callback in self.on_failure:
                callback()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admitting; end the requests queued and running (finish_reason "cancelled"); let the other
        ranks' engines return; wait for the engine's thread."""
        self.stopping = True
        if self._loaded is not None:
            self._loaded.shutdown()
        if self._engine_thread is not None and self._engine_thread is not threading.current_thread():
            self._engine_thread.join(timeout)

    def admit(self) -> Llama:
        """The model, if it takes requests now; else the 503 that says why not."""
        if self.failure is not None:
            raise APIError(503, "a model worker stopped: the server is going down", code="engine_failed")
        if self.stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.llama is None:
            raise APIError(503, "the model is still loading: retry shortly", code="loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.llama

    def watch(self, prompts: List[List[int]], sampling: Sampling, max_new: List[int],
              decode_after: Optional[List[int]] = None) -> Watch:
        """Submit `sampling.n` choices of each prompt (choice k of prompt i seeded seed + i * n + k):
        all of them, or none with the error."""
        g = self.admit()
        n = sampling.n
        room = g.max_batch_size + self.max_queue
        if len(prompts) * n > room:  # could never be admitted: a 429's "retry later" would be a lie
            raise invalid(f"{len(prompts)} prompt(s) x n={n} make {len(prompts) * n} completions, more than this "
                          f"server holds at once ({g.max_batch_size} running + {self.max_queue} waiting): send "
                          "fewer in one request", "prompt" if len(prompts) > 1 else "n")

        def submit(i: int, k: int) -> Callable[[Callable[[], None]], Completion]:
            seed = None if sampling.seed is None else sampling.seed + i * n + k
            return lambda on_change: g.submit(
                prompts[i], max_new[i], seed=seed, echo=sampling.echo, params=sampling.params,
                decode_after=decode_after, max_waiting=self.max_queue, on_change=on_change)

        try:
            watch = Watch([submit(i, k) for i in range(len(prompts)) for k in range(n)], on_finish=self._finished,
                          interval=self.stream_interval, stream=sampling.stream)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        except (ValueError, TypeError) as e:
            raise invalid(str(e), _param_of(str(e))) from None
        with self._watches_lock:
            self._watches.add(watch)
        return watch

    def _finished(self, c: Completion) -> None:
        self.metrics.ttft(c.ttft)


def _param_of(message: str) -> Optional[str]:
    """The request field a library error is about, from how its message begins."""
    for start, param in (("logit_bias", "logit_bias"), ("stop", "stop"), ("prompt", "prompt"),
                         ("the json_schema", "response_format"), ("the json_object", "response_format"),
                         ("the regex", "response_format"), ("the lark", "response_format"),
                         ("the gbnf", "response_format"), ("the constraint", "response_format")):
        if message.startswith(start):
            return param
    return None
