"""The engine: the one loop of the library. A step is three calls between plain data: the
scheduler plans it (llama.scheduler), the runner executes it (llama.runner), and the scheduler
and the requests take its output.

Requests wait in the scheduler's queue; between two steps, ended requests leave and waiting ones
start (iteration-level scheduling, as in Orca and vLLM), their prompts prefilled a chunk per step
beside the running rows' decoding, their keys and values in a paged KV cache with prefix caching.

Calls wait for their requests (`Engine.run`) while one thread runs the steps for all of them: at
model-parallel size 1 a driver thread started when there is work, ending when there is none (or
the thread in `serve_forever`); under model parallelism, so that every rank issues its collectives
from one thread, the calling thread itself (research code is SPMD: every rank makes the same calls)
or, for a server, `serve_forever` on every rank.

Under model parallelism rank 0 decides: it sends each step's plan, then the step's events (tokens
taken, requests ended) to the other ranks (llama.distributed.StepChannel), which run the same
forwards and apply the same events to their own requests, if they made the same calls (SPMD), or
serve rank 0's requests without requests of their own (`serve_forever`). Several engines in one process
share one channel (llama.distributed.shared_channel): rank 0 runs one engine's step at a time, its
messages tagged with the engine's `tag`, and the other ranks follow them in that order (llama.pool).

LoRA adapters (llama.adapters) load between two steps: a load waits for the next step (or, with no
step running, applies at once), which carries it to every rank before its forwards; the name is usable
once every rank has it. A request holds its adapter's slot until it ends, so an unloaded (or reloaded)
adapter's slot is reused only after its last request.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from llama.adapters import AdapterTable, AdapterWeights, Entry, LoadAdapter
from llama.distributed import LOCATE, SHUTDOWN, RankError, follow, model_parallel, shared_channel
from llama.errors import LogitsError
from llama.grammar import Grammars
from llama.model import Transformer
from llama.runner import Runner
from llama.sampling import SamplingParams
from llama.scheduler import Alternatives, Event, Output, Plan, Scheduler, Sequence
from llama.text import TextStream
from llama.tokenizer import AnyTokenizer

log = logging.getLogger(__name__)

_IDLE_EXIT_S = 1.0  # a driver thread ends after this long without work


class QueueFull(RuntimeError):
    """More requests wait than the caller allows (`max_waiting`)."""


class EngineStopped(RuntimeError):
    """The engine was shut down, or a step failed under model parallelism: no request can run any more."""


@dataclass(eq=False)
class Request:
    """One prompt to continue (or, with max_new 0, to score), and what its caller reads back.

    `text_context` asks for text: the tokens after which the generated text is decoded (see
    llama.text.TextStream); without it (None) no text is decoded and stop strings cannot apply.
    """

    prompt: List[int]
    params: SamplingParams
    max_new: int
    seed: int = 0
    stop_ids: frozenset = frozenset()  # the tokenizer's stop tokens and the params'
    text_context: Optional[List[int]] = None
    index: int = 0  # its row in the call that made it, for error messages
    follow: bool = False  # its caller waits for each new token (a stream), not only for the end
    adapter: Optional[str] = None  # the name of the LoRA adapter it runs with (llama.adapters), None: the base

    # Filled in by the engine.
    id: int = -1
    tokens: List[int] = field(default_factory=list)  # new tokens, stop tokens excluded
    token_logprobs: List[Optional[float]] = field(default_factory=list)
    token_top_logprobs: List[Alternatives] = field(default_factory=list)  # with top_logprobs
    prompt_logprobs: List[float] = field(default_factory=list)  # of prompt[1:], with prompt_logprobs
    prompt_greedy: List[bool] = field(default_factory=list)  # prompt[t + 1] is the argmax after prompt[:t + 1]
    prompt_top_logprobs: List[Alternatives] = field(default_factory=list)  # with top_logprobs and prompt_logprobs
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    stream: Optional[TextStream] = None
    finish_reason: Optional[str] = None  # "stop", "length", "cancelled" or "error"
    error: Optional[BaseException] = None
    cancelled: bool = False
    waiter: Optional[threading.Condition] = None
    adapter_entry: Optional[Entry] = None  # the adapter it holds until it ends
    submitted_at: float = 0.0
    first_token_at: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: Optional[float], top: Alternatives = None) -> bool:
        """Take a new token; True if a stop string appeared in the text."""
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.token_top_logprobs.append(top)
        return self.stream is not None and self.stream.push(token)

    def finish(self, reason: str, error: Optional[BaseException] = None) -> None:
        if self.done:
            return
        self.finish_reason, self.error = reason, error
        if self.stream is not None:
            self.stream.finish()


@dataclass(eq=False)
class _PendingLoad:
    """An adapter load waiting for a step boundary, and its outcome."""

    load: LoadAdapter
    entry: Entry
    done: bool = False
    error: Optional[str] = None


@dataclass
class Stats:
    """Counters for monitoring (a server's /metrics)."""

    requests_submitted: int = 0
    requests_finished: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # taken from the prefix cache
    prompt_tokens_computed: int = 0  # run through the model (recomputations after a preemption included)
    generated_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    kv_blocks: int = 0  # of the KV cache, the padding block aside
    kv_blocks_used: int = 0  # held by requests
    kv_blocks_cached: int = 0  # holding a cached prefix, held or free


class Engine:
    def __init__(self, model: Transformer, tokenizer: AnyTokenizer, prefill_chunk: int = 128,
                 prefix_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = model.params.max_batch_size
        self.max_seq_len = model.rope.shape[0]
        self.prefill_chunk = prefill_chunk
        num_blocks = model.layers[0].attention.cache.shape[0]
        self.scheduler = Scheduler(num_blocks, model.block_size, self.max_batch_size, self.max_seq_len,
                                   prefill_chunk, prefix_cache)
        self.grammars = Grammars(tokenizer, model.vocab_size)
        self.runner = Runner(model, self.max_batch_size, self.max_seq_len, self.grammars)
        self.lock = self._lock = threading.RLock()  # guards the requests' state; held only between steps
        self._wake = threading.Condition(self._lock)  # a dedicated driver waits here for work
        self._requests: Dict[int, Request] = {}  # not yet finished, by id (on every rank alike)
        self._ids = itertools.count()
        self._driver: Optional[object] = None  # the id of the thread running steps
        self._serving = False  # rank 0 runs serve_forever: other threads never drive
        self._stopped: Optional[str] = None
        self.stats = Stats()
        self.mp_rank, self.mp_size = model_parallel()
        self.channel = shared_channel().tagged() if self.mp_size > 1 else None
        self.adapters = AdapterTable()  # rank 0's (and, SPMD, every rank's) adapter names and slots
        self._loads: List[_PendingLoad] = []  # for the next step
        self._loaded = threading.Condition(self._lock)  # notified when loads are done
        if self.channel is not None:
            self.runner.agree = self.channel.agree
        self._count()

    # Calls from the API's threads.

    @property
    def leader(self) -> bool:
        return self.mp_rank == 0

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def tag(self) -> Optional[str]:
        """The name this engine's messages carry to the other ranks (None: the process's only engine)."""
        return None if self.channel is None else self.channel.tag

    @tag.setter
    def tag(self, tag: Optional[str]) -> None:
        if self.channel is not None:
            self.channel.tag = tag

    @property
    def kv_cache_tokens(self) -> int:
        return self.scheduler.capacity()

    def waiter(self) -> threading.Condition:
        """A condition for one call to wait on (`run`), notified when any of its requests changes."""
        return threading.Condition(self._lock)

    def submit(self, requests: List[Request], waiter: threading.Condition,
               max_waiting: Optional[int] = None) -> None:
        """Queue `requests` (already validated); `waiter` is notified whenever one of them changes."""
        with self._lock:
            if self._stopped is not None:
                raise EngineStopped(self._stopped)
            s = self.scheduler
            free = self.max_batch_size - len(s.running)  # taken at the next step: those requests never wait
            if max_waiting is not None and len(s.waiting) + len(requests) - free > max_waiting:
                raise QueueFull(f"{len(s.waiting)} requests are already waiting (the limit is {max_waiting}): "
                                "retry later")
            entries = [None if r.adapter is None else self.adapters.lookup(r.adapter) for r in requests]
            now = time.perf_counter()
            for r, entry in zip(requests, entries):
                r.id, r.waiter, r.submitted_at = next(self._ids), waiter, now
                if entry is not None:
                    r.adapter_entry = entry
                    self.adapters.acquire(entry)
                if r.text_context is not None:
                    r.stream = TextStream(self.tokenizer, r.text_context, r.params.stop)
                self.stats.requests_submitted += 1
                self.stats.prompt_tokens += len(r.prompt)
                self._requests[r.id] = r
                if r.max_new == 0 and not r.params.prompt_logprobs:
                    self._end(r, "length")  # nothing to compute
                    continue
                if self.leader:
                    s.add(Sequence(r.id, list(r.prompt), r.max_new, r.stop_ids, r.params.prompt_logprobs, r.params,
                                   r.seed, cache_salt=b"" if entry is None else entry.salt,
                                   adapter=0 if entry is None else entry.slot))
            self._wake.notify_all()

    def cancel(self, requests: List[Request]) -> None:
        """Ask for `requests` to stop: they end at the next step. Safe from any thread and from a
        finalizer (takes no lock)."""
        for r in requests:
            r.cancelled = True

    def run(self, until: Callable[[], bool], waiter: threading.Condition) -> None:
        """Return once `until()` holds (checked under the engine's lock). Meanwhile the steps run in a
        driver thread; under model parallelism, unless rank 0 serves, in this one."""
        with self._lock:
            while not until():
                if self._stopped is not None and not self._driver_is_me():
                    self._fail_pending()
                    if until():
                        return
                    raise EngineStopped(self._stopped)
                if self._driver is None and not self._serving:
                    if self.mp_size > 1:
                        self._drive(until)  # SPMD: every rank's calling thread runs the same steps
                        continue
                    self._start_driver()
                waiter.wait(timeout=0.5)  # woken by each change of its requests; the timeout is a safety net

    # LoRA adapters.

    def load_adapter(self, name: str, weights: AdapterWeights) -> None:
        """(under model parallelism every rank alike, unless rank 0 serves: then rank 0 alone) Load opened
        adapter weights (llama.adapters.open_weights) into a free slot under `name`, between two steps, and
        return once every rank has them. A name already loaded then names the new weights; requests that
        use the old ones finish with them."""
        with self._lock:
            if self._stopped is not None:
                raise EngineStopped(self._stopped)
            entry = self.adapters.reserve(name, weights.path, weights.nbytes)
            pending = _PendingLoad(LoadAdapter(entry.generation, entry.slot, weights.path, weights.signature), entry)
            self.runner.prepared[pending.load.id] = weights
            self._loads.append(pending)
            while not pending.done:
                if self._stopped is not None and pending in self._loads:
                    self._loads.remove(pending)
                    self._finish_loads([pending], {pending.load.id: self._stopped})
                    raise EngineStopped(self._stopped)
                if self._driver is None and not self._serving:  # no step runs, nor can start: load here
                    loads, self._loads = self._loads, []
                    self._finish_loads(loads, self.runner.load_adapters([p.load for p in loads]))
                    continue
                self._wake.notify_all()  # the driver takes it with its next step
                self._loaded.wait(timeout=0.5)
        if pending.error is not None:
            raise RankError(f"adapter {name!r} from {weights.path} could not be loaded: {pending.error}")

    def unload_adapter(self, name: str) -> None:
        """Forget adapter `name` at once (new requests for it are refused); its slot is freed once the
        requests using it have ended."""
        with self._lock:
            self.adapters.unload(name)

    def _finish_loads(self, loads: List[_PendingLoad], errors: Dict[int, str]) -> None:
        """(lock held) Loads every rank has applied (or failed: `errors`): their names now mean them."""
        for p in loads:
            self.runner.prepared.pop(p.load.id, None)
            p.error = errors.get(p.load.id)
            if p.error is None:
                self.adapters.activate(p.entry)
            else:
                self.adapters.discard(p.entry)
            p.done = True
        if loads:
            self._loaded.notify_all()

    def pending(self) -> tuple:
        """(requests waiting to start, requests running)."""
        with self._lock:
            return len(self.scheduler.waiting), len(self.scheduler.running)

    def compile_all(self) -> int:
        """(every rank alike, while no request runs) Compile the decode step for every bucket of rows and
        of keys now, rather than on first use in the middle of other requests' steps; returns how many."""
        with self._lock:
            if self._requests:
                raise RuntimeError("compile_all runs before any request: requests are running")
        return self.runner.compile_all()

    def _start_driver(self) -> None:
        """(lock held, model-parallel size 1) A thread to run the steps while there is work. One thread
        stepping for every caller, rather than each caller in turn, keeps the steps back to back."""
        self._driver = "starting"
        threading.Thread(target=self._drive_while_busy, name="llama-engine", daemon=True).start()

    def _drive_while_busy(self) -> None:
        if self.runner.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.runner.device)  # the current device is per thread
        with self._lock:
            self._driver = threading.get_ident()
            try:
                while self._stopped is None and not self._serving:
                    if not self._step() and not self._wake.wait(timeout=_IDLE_EXIT_S) and not self._requests:
                        break  # idle: end, so that a dropped Llama is not kept alive by its thread
            except BaseException as e:  # a bug: the waiters must hear of it rather than wait forever
                self._stopped = f"the engine's thread failed: {type(e).__name__}: {e}"
                self._fail_pending()
                raise
            finally:
                self._driver = None
                self._wake_waiters()

    # Serving.

    def serve_forever(self, on_ready: Optional[Callable[[], None]] = None) -> None:
        """Rank 0: drive every step until `shutdown`, for requests from other threads; `on_ready` is
        called once requests from them are safe (taken locally, never on the caller's thread's
        collectives). Other ranks: run rank 0's steps until it shuts down."""
        if not self.leader:
            with self._lock:
                self._driver = threading.get_ident()
            try:
                while self._follow_step():
                    pass
            finally:
                with self._lock:
                    self._driver = None
            return
        with self._lock:
            if self._serving:
                raise RuntimeError("serve_forever is already running")
            self._serving = True
            while self._driver is not None:  # a driver thread, which ends now that serve_forever drives
                self._wake.notify_all()
                self._wake.wait(timeout=0.05)
            self._driver = threading.get_ident()
            if on_ready is not None:
                on_ready()
            try:
                while self._stopped is None:
                    if not self._step():
                        self._wake.wait(timeout=0.1)
                self._drain()
            finally:
                self._driver = None
                self._wake_waiters()

    def shutdown(self, reason: str = "the engine was shut down") -> None:
        """Stop admitting; end what runs and waits with finish_reason "cancelled"; let the other ranks'
        serve_forever return. Without serve_forever running, takes effect at once."""
        with self._lock:
            if self._stopped is None:
                self._stopped = reason
            if self._serving:
                self._wake.notify_all()
                return
            self._drain()

    def _drain(self) -> None:
        """(lock held) End every request, and tell the other ranks to stop following."""
        for r in list(self._requests.values()):
            self.scheduler.finish(r.id, "cancelled")
            self._end(r, "cancelled")
        if self.mp_size > 1 and self.leader:
            self._lock.release()
            try:
                with self.channel.turn:
                    self.channel.send(SHUTDOWN)
            finally:
                self._lock.acquire()
        self._wake_waiters()

    # The loop.

    def _driver_is_me(self) -> bool:
        return self._driver == threading.get_ident()

    def _drive(self, until: Callable[[], bool]) -> None:
        """(lock held) Run steps until `until()`; then let another waiting thread take over."""
        self._driver = threading.get_ident()
        try:
            while not until():
                if not (self._step() if self.leader else self._follow_unlocked()):
                    raise RuntimeError("the engine has nothing to run for a call that is not done: this is a bug")
        finally:
            self._driver = None
            self._wake_waiters()

    def _step(self) -> bool:
        """(lock held) One step on rank 0: schedule, execute, update. False when there was nothing to run."""
        events = self._end_cancelled()
        plan = self.scheduler.schedule()
        loads, self._loads = self._loads, []
        if plan is None:
            if not events and not loads:
                return False
            plan = Plan()  # nothing to run, but the other ranks learn of the cancellations and loads
        else:
            self.stats.steps += 1
        plan.adapters = [p.load for p in loads]
        self._lock.release()
        if self.channel is not None:  # the other ranks get this step whole, between other engines' steps
            self.channel.turn.acquire()
        try:
            try:
                output = self._execute(plan)
            except BaseException as e:
                self._lock.acquire()
                self._finish_loads(loads, {p.load.id: f"{type(e).__name__}: {e}" for p in loads})
                self._step_failed(plan, e)
                return True
            self._lock.acquire()
            self._finish_loads(loads, output.adapter_errors)
            events += self.scheduler.update(plan, output)
            self._apply(events)
            self._count()
            if self.mp_size > 1:
                self._lock.release()
                try:
                    self.channel.send(events)
                finally:
                    self._lock.acquire()
        finally:
            if self.channel is not None:
                self.channel.turn.release()
        return True

    def _execute(self, plan: Plan) -> Output:
        """(rank 0, no lock) Run a planned step on every rank and sample its tokens."""
        if self.mp_size > 1:
            self.channel.send(plan)
        output = self.runner.execute(plan)
        nonfinite = [seq_id for seq_id, why in output.failed.items() if not why]
        if nonfinite:  # name the module whose output first turned non-finite: every rank re-runs the step
            if self.mp_size > 1:
                self.channel.send((LOCATE, nonfinite))
            where = self.runner.recover(plan, nonfinite)
            for seq_id in nonfinite:
                r = self._requests.get(seq_id)
                index, step = (r.index, len(r.tokens)) if r is not None else (0, 0)
                output.failed[seq_id] = (
                    f"row {index} at generation step {step}: the model's logits are NaN, +inf or all -inf "
                    "(overflow in the weights or dtype); try dtype='float32' or 'bf16'. First non-finite "
                    f"output: {where}")
        return output

    def _count(self) -> None:
        s, pool, stats = self.scheduler, self.scheduler.pool, self.stats
        stats.prompt_tokens_cached, stats.prompt_tokens_computed = s.prompt_tokens_cached, s.prompt_tokens_computed
        stats.preemptions = s.preemptions
        stats.kv_blocks, stats.kv_blocks_used, stats.kv_blocks_cached = pool.num_blocks - 1, pool.num_used, pool.num_cached

    def _end_cancelled(self) -> List[Event]:
        """(lock held, rank 0) End the requests cancelled since the last step, as events for every rank."""
        events = []
        for r in [r for r in self._requests.values() if r.cancelled]:
            self.scheduler.finish(r.id, "cancelled")
            self._end(r, "cancelled")  # at once: a caller that sees its slot free sees the request counted too
            events.append(Event(r.id, finish_reason="cancelled"))
        return events

    def _apply(self, events: List[Event]) -> None:
        """(lock held, every rank) Record a step's events in the requests they name."""
        for e in events:
            r = self._requests.get(e.seq_id)
            if r is None:
                continue
            if e.stats is not None:
                r.prompt_logprobs += e.stats.logprobs
                r.prompt_greedy += e.stats.greedy
                r.prompt_top_logprobs += e.stats.top or []
            if r.first_token_at is None and (e.token is not None or e.finish_reason == "stop"):
                r.first_token_at = time.perf_counter()
            if e.cached_tokens is not None:
                r.cached_tokens = e.cached_tokens
            reason = e.finish_reason
            error = None if e.error is None else LogitsError(e.error)
            if e.token is not None:
                self.stats.generated_tokens += 1
                try:
                    stopped = r.add(e.token, e.logprob, e.top)
                except Exception as failure:  # noqa: BLE001 - e.g. its text; the request fails, not the engine
                    stopped, error = True, failure
                if stopped:  # a stop string, or a failure: the scheduler learns it from here
                    if reason is None and self.leader:
                        self.scheduler.finish(r.id, "stop" if error is None else "error")
                    reason = "error" if error is not None else reason or "stop"
            if reason is not None:
                self._end(r, reason, error)
            elif r.follow and r.waiter is not None and (e.token is not None or e.stats is not None):
                r.waiter.notify_all()

    def _end(self, r: Request, reason: str, error: Optional[BaseException] = None) -> None:
        """(lock held) Finish `r` if it is not yet and tell its waiter."""
        r.finish(reason, error)
        if self._requests.pop(r.id, None) is not None:
            self.stats.requests_finished += 1
            if r.adapter_entry is not None:
                self.adapters.release(r.adapter_entry)
        if r.waiter is not None:
            r.waiter.notify_all()

    def _step_failed(self, plan: Plan, error: BaseException) -> None:
        """(lock held) A step raised. Alone, its rows fail with the error and the others go on; under model
        parallelism the ranks may no longer agree, so the engine stops and the error propagates."""
        for row in plan.rows:
            self.scheduler.finish(row.seq_id, "error")
            r = self._requests.get(row.seq_id)
            if r is not None:
                self._end(r, "error", error)
        if self.mp_size > 1 or not isinstance(error, Exception):
            self._stopped = f"a step failed: {type(error).__name__}: {error}"
            for r in list(self._requests.values()):
                self.scheduler.finish(r.id, "error")
                self._end(r, "error", error)
            raise error
        log.error("a step failed; its %d request(s) get the error: %s: %s", len(plan.rows), type(error).__name__,
                  error)

    def _fail_pending(self) -> None:
        """(lock held) After a stop, end whatever a waiter still waits for."""
        for r in list(self._requests.values()):
            self._end(r, "error", EngineStopped(self._stopped))

    def _wake_waiters(self) -> None:
        """(lock held) Wake every waiting call, so one of them takes over driving."""
        for r in list(self._requests.values()):
            if r.waiter is not None:
                r.waiter.notify_all()
        self._wake.notify_all()

    # Ranks above 0.

    def _follow_unlocked(self) -> bool:
        self._lock.release()
        try:
            return self._follow_step()
        finally:
            self._lock.acquire()

    def follow_step(self, plan=None) -> bool:
        """(rank > 0, no lock) Run rank 0's next step, or the one whose `plan` a dispatcher received for
        this engine (llama.pool). False at shutdown."""
        return self._follow_step(plan)

    def _follow_step(self, plan=None) -> bool:
        """(rank > 0, no lock) One of rank 0's steps. False at shutdown."""
        if follow(self.channel, self.runner, self._apply_locked, *(() if plan is None else (plan,))):
            return True
        with self._lock:
            self._stopped = self._stopped or "rank 0 shut the engine down"
            for r in list(self._requests.values()):
                self._end(r, "cancelled")
        return False

    def _apply_locked(self, events: List[Event]) -> None:
        with self._lock:
            self._apply(events)
