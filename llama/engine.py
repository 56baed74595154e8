"""The engine: KV-cache slots, the request queue, and the one decode loop of the library.

Requests wait in a FIFO queue. Between two steps, finished or cancelled rows leave their slots and
waiting requests take the free ones (iteration-level scheduling, as in Orca and vLLM). A new
prompt is prefilled into its slot in chunks, at most `prefill_chunk` tokens per step, in the same
steps as the running rows' decoding: a long prompt holds them up one chunk at a time.

Calls wait for their requests (`Engine.run`) while one thread runs the steps for all of them: at
model-parallel size 1 a driver thread started when there is work, ending when there is none
(or the thread in `serve_forever`); under model parallelism, so that every rank issues its
collectives from one thread, the calling thread itself (research code is SPMD: every rank makes
the same calls) or, for a server, `serve_forever` on every rank.

Under model parallelism rank 0 decides: each step's plan (the forwards' inputs: tokens,
positions, slots) and its results (sampled tokens, finished and failed requests) are broadcast
from it on a gloo group of the model-parallel ranks. The other ranks run the same forwards and
apply the same results to their own requests, if they made the same calls (SPMD), or serve rank
0's requests without requests of their own (`serve_forever`).
"""
from __future__ import annotations

import datetime
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init

from llama.errors import LogitsError
from llama.model import Transformer
from llama.numerics import first_nonfinite
from llama.sampling import sample
from llama.text import TextStream
from llama.tokenizer import AnyTokenizer

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests wait than the caller allows (`max_waiting`)."""


class EngineStopped(RuntimeError):
    """The engine was shut down, or a step failed under model parallelism: no request can run any more."""


@dataclass(eq=False)
class Request:
    """One sequence to continue (or, with max_new 0, to score), with its own sampling parameters.

    `text_context` asks for text: the tokens after which the generated text is decoded (see
    llama.text.TextStream); without it (None) no text is decoded and stop strings cannot apply.
    `prompt_stats` asks for each prompt token's log-probability and greedy flag (echo, scoring).
    """

    prompt: List[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: FrozenSet[int] = frozenset()
    stop: Sequence[str] = ()
    text_context: Optional[List[int]] = None
    logprobs: bool = False
    prompt_stats: bool = False
    seed: int = 0
    index: int = 0  # its row in the call that made it, for error messages
    follow: bool = False  # its caller waits for each new token (a stream), not only for the end

    # Filled in by the engine.
    id: int = -1
    slot: Optional[int] = None
    filled: int = 0  # prompt tokens in the KV cache
    tokens: List[int] = field(default_factory=list)  # new tokens, stop tokens excluded
    token_logprobs: List[float] = field(default_factory=list)
    prompt_logprobs: List[float] = field(default_factory=list)  # of prompt[1:], with prompt_stats
    prompt_greedy: List[bool] = field(default_factory=list)  # prompt[t + 1] is the argmax after prompt[:t + 1]
    stream: Optional[TextStream] = None
    finish_reason: Optional[str] = None  # "stop", "length", "cancelled" or "error"
    error: Optional[BaseException] = None
    cancelled: bool = False
    generator: Optional[torch.Generator] = None
    waiter: Optional[threading.Condition] = None
    submitted_at: float = 0.0
    first_token_at: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: Optional[float]) -> None:
        """Take a sampled token: end at a stop token, a stop string, or the token limit."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self.finish("stop")
            return
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        if self.stream is not None and self.stream.push(token):
            self.finish("stop")
        elif len(self.tokens) >= self.max_new:
            self.finish("length")

    def finish(self, reason: str, error: Optional[BaseException] = None) -> None:
        if self.done:
            return
        self.finish_reason, self.error = reason, error
        if self.stream is not None:
            self.stream.finish()


@dataclass
class Forward:
    """One forward pass of a step: tokens (B, T) at positions (B, T) into KV-cache slots (B,)."""

    tokens: torch.Tensor
    positions: Union[int, torch.Tensor]  # an int: every row's first token is there
    slots: Optional[torch.Tensor]  # None: slots 0..B-1
    kv_len: int
    rows: int  # rows that are real (the rest pad a compiled decode to its bucket)
    select: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (row, column) of the positions whose logits are wanted
    compiled: bool = False


@dataclass
class Plan:
    """What every rank runs in one step."""

    decode: Optional[Forward] = None
    prefill: Optional[Forward] = None
    shutdown: bool = False


@dataclass
class Results:
    """What a step did to its requests, by request id; applied alike on every rank."""

    tokens: List[Tuple[int, int, Optional[float]]] = field(default_factory=list)  # (id, token, logprob)
    prompt: List[Tuple[int, List[float], List[bool]]] = field(default_factory=list)  # (id, logprobs, greedy)
    filled: List[Tuple[int, int]] = field(default_factory=list)  # (id, prompt tokens now cached)
    failed: List[Tuple[int, str]] = field(default_factory=list)  # (id, LogitsError message)
    locate: bool = False  # not results yet: every rank re-runs the step under hooks first


@dataclass
class Stats:
    """Counters for monitoring (a server's /metrics)."""

    requests_submitted: int = 0
    requests_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    ttft_seconds: List[float] = field(default_factory=list)  # the most recent requests', bounded


_TTFT_KEPT = 1000
MIN_KV_BUCKET = 128  # the fewest keys a compiled decode step reads (see kv_bucket)
_IDLE_EXIT_S = 1.0  # a driver thread ends after this long without work
# A follower waits in a broadcast while rank 0 is idle: only rank 0's exit (which breaks the
# connection at once) or its shutdown should end that wait.
_IDLE_TIMEOUT = datetime.timedelta(days=365)
Rows = List[Tuple["Request", Optional[int]]]  # a step's requests: (request, prompt tokens prefilled, or None: decoded)


class Engine:
    def __init__(self, model: Transformer, tokenizer: AnyTokenizer, prefill_chunk: int = 128):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_seq_len = model.cache_shape
        self.prefill_chunk = prefill_chunk
        self.device = model.tok_embeddings.weight.device
        self.lock = self._lock = threading.RLock()  # guards the requests' state; held only between steps
        self._wake = threading.Condition(self._lock)  # a dedicated driver waits here for work
        self._waiting: Deque[Request] = deque()
        self._slots: List[Optional[Request]] = [None] * self.max_batch_size
        self._by_id: Dict[int, Request] = {}  # requests not yet finished, for results broadcast by rank 0
        self._ids = itertools.count()
        self._driver: Optional[object] = None  # the id of the thread running steps
        self._serving = False  # rank 0 runs serve_forever: other threads never drive
        self._stopped: Optional[str] = None
        self.stats = Stats()
        self.mp_rank, self.mp_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
        self._group, self._src = _control_group() if self.mp_size > 1 else (None, 0)
        self._buckets = _buckets(self.max_batch_size)

    # Calls from the API's threads.

    @property
    def leader(self) -> bool:
        return self.mp_rank == 0

    @property
    def serving(self) -> bool:
        return self._serving

    def waiter(self) -> threading.Condition:
        """A condition for one call to wait on (`run`), notified when any of its requests changes."""
        return threading.Condition(self._lock)

    def submit(self, requests: Sequence[Request], waiter: threading.Condition,
               max_waiting: Optional[int] = None) -> None:
        """Queue `requests` (already validated); `waiter` is notified whenever one of them changes."""
        with self._lock:
            if self._stopped is not None:
                raise EngineStopped(self._stopped)
            waiting = sum(not r.cancelled for r in self._waiting)
            free = sum(r is None for r in self._slots)  # taken at the next step: those requests never wait
            if max_waiting is not None and waiting + len(requests) - free > max_waiting:
                raise QueueFull(f"{waiting} requests are already waiting (the limit is {max_waiting}): retry later")
            now = time.perf_counter()
            for r in requests:
                r.id, r.waiter, r.submitted_at = next(self._ids), waiter, now
                if r.text_context is not None:
                    r.stream = TextStream(self.tokenizer, r.text_context, r.stop)
                self.stats.requests_submitted += 1
                self.stats.prompt_tokens += len(r.prompt)
                self._by_id[r.id] = r
                if r.max_new == 0 and not r.prompt_stats:
                    self._end(r, "length")  # nothing to compute
                    continue
                if self.leader:
                    self._waiting.append(r)
            self._wake.notify_all()

    def cancel(self, requests: Sequence[Request]) -> None:
        """Ask for `requests` to stop: they leave their slots at the next step. Safe from any thread and
        from a finalizer (takes no lock)."""
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

    def pending(self) -> Tuple[int, int]:
        """(requests waiting for a slot, requests in slots)."""
        with self._lock:
            return sum(not r.cancelled for r in self._waiting), sum(r is not None for r in self._slots)

    def _start_driver(self) -> None:
        """(lock held, model-parallel size 1) A thread to run the steps while there is work. One thread
        stepping for every caller, rather than each caller in turn, keeps the steps back to back."""
        self._driver = "starting"
        threading.Thread(target=self._drive_while_busy, name="llama-engine", daemon=True).start()

    def _drive_while_busy(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        with self._lock:
            self._driver = threading.get_ident()
            try:
                while self._stopped is None and not self._serving:
                    if not self._step() and not self._wake.wait(timeout=_IDLE_EXIT_S) and not self._busy():
                        break  # idle: end, so that a dropped Llama is not kept alive by its thread
            finally:
                self._driver = None
                self._wake_waiters()

    def _busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._slots)

    # Serving.

    def serve_forever(self) -> None:
        """Rank 0: drive every step until `shutdown`, for requests from other threads. Other ranks:
        run rank 0's steps until it shuts down."""
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
            try:
                while self._stopped is None:
                    if not self._step():
                        self._wake.wait(timeout=0.1)
                self._drain()
            finally:
                self._driver = None
                self._wake_waiters()

    def shutdown(self, reason: str = "the engine was shut down") -> None:
        """Stop admitting; finish what runs and waits with finish_reason "cancelled"; let the other ranks'
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
        for r in list(self._waiting) + [r for r in self._slots if r is not None]:
            self._end(r, "cancelled")
        self._waiting.clear()
        self._slots = [None] * self.max_batch_size
        if self.mp_size > 1 and self.leader:
            self._broadcast(Plan(shutdown=True))
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
        """(lock held) One step on rank 0: schedule, run, sample, apply. False when there was nothing to run."""
        plan, rows = self._schedule()
        if plan is None:
            return False
        self._lock.release()
        try:
            results = self._lead(plan, rows)
        except BaseException as e:
            self._lock.acquire()
            self._step_failed(rows, e)
            return True
        self._lock.acquire()
        self._apply(results)
        return True

    def _lead(self, plan: Plan, rows: Rows) -> Results:
        """(rank 0, no lock) Run a planned step on every rank and sample its tokens."""
        if self.mp_size > 1:
            self._broadcast(plan)
        results, bad = self._sample(rows, *self._run(plan))
        if bad:  # name the module whose output first turned non-finite: every rank re-runs the step
            if self.mp_size > 1:
                self._broadcast(Results(locate=True))
            where = first_nonfinite(self.model, lambda: self._run(plan)) or "none in a module"
            results.failed = [(r.id, f"row {r.index} at generation step {len(r.tokens)}: the model's logits are "
                               "NaN, +inf or all -inf (overflow in the weights or dtype); try dtype='float32' or "
                               f"'bf16'. First non-finite output: {where}") for r in bad]
        if self.mp_size > 1:
            self._broadcast(results)
        return results

    def _follow_unlocked(self) -> bool:
        self._lock.release()
        try:
            return self._follow_step()
        finally:
            self._lock.acquire()

    def _follow_step(self) -> bool:
        """(rank > 0, no lock) Receive rank 0's plan, run it, apply its results. False at shutdown."""
        plan = self._receive()
        if plan.shutdown:
            with self._lock:
                self._stopped = self._stopped or "rank 0 shut the engine down"
                for r in list(self._by_id.values()):
                    self._end(r, "cancelled")
            return False
        self._run(plan)
        results = self._receive()
        if results.locate:
            first_nonfinite(self.model, lambda: self._run(plan))
            results = self._receive()
        with self._lock:
            self._apply(results)
        return True

    def _schedule(self) -> Tuple[Optional[Plan], Rows]:
        """(lock held) Free the slots of cancelled requests, admit waiting ones, and plan one step: every
        decoding row's next token, plus up to prefill_chunk tokens (padding included) of prompts."""
        for slot, r in enumerate(self._slots):
            if r is not None and (r.cancelled or r.done):
                self._end(r, "cancelled")
                self._slots[slot] = None
        if any(r.cancelled for r in self._waiting):
            for r in self._waiting:
                if r.cancelled:
                    self._end(r, "cancelled")
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for slot in range(self.max_batch_size):
            if not self._waiting:
                break
            if self._slots[slot] is None:
                r = self._waiting.popleft()
                r.slot = slot
                if r.temperature > 0:
                    r.generator = torch.Generator().manual_seed(r.seed)
                self._slots[slot] = r
        active = [r for r in self._slots if r is not None]
        decoding = [r for r in active if r.filled == len(r.prompt)]
        prefilling = sorted((r for r in active if r.filled < len(r.prompt)), key=lambda r: r.id)
        rows: Rows = []
        plan = Plan(decode=self._plan_decode(decoding, rows), prefill=self._plan_prefill(prefilling, rows))
        if plan.decode is None and plan.prefill is None:
            return None, []
        self.stats.steps += 1
        return plan, rows

    def _plan_decode(self, requests: List[Request], rows: Rows) -> Optional[Forward]:
        if not requests:
            return None
        B = len(requests)
        tokens = [r.tokens[-1] for r in requests]
        positions = [len(r.prompt) + len(r.tokens) - 1 for r in requests]
        slots = [r.slot for r in requests]
        rows += [(r, None) for r in requests]
        if self.model.compiled is not None:
            # A compiled step has a fixed number of rows and a fixed kv_len per bucket. Pad rows go to
            # slots no real row uses, at the last position, which no live sequence has filled (prompts
            # are shorter than max_seq_len), so every real row's cache stays intact.
            bucket = next(b for b in self._buckets if b >= B)
            used = set(slots)
            spare = [s for s in range(self.max_batch_size) if s not in used][: bucket - B]
            grid = self._tensor([tokens + [0] * len(spare), positions + [self.max_seq_len - 1] * len(spare),
                                 slots + spare])  # one copy to the device for the three
            kv_len = kv_bucket(max(positions) + 1, self.max_seq_len)
            return Forward(grid[0].view(-1, 1), grid[1].view(-1, 1), grid[2], kv_len, B, compiled=True)
        slot_tensor = None if slots == list(range(B)) else self._tensor(slots)
        if all(p == positions[0] for p in positions):  # an int position: no mask to build
            return Forward(self._tensor(tokens).view(-1, 1), positions[0], slot_tensor, positions[0] + 1, B)
        grid = self._tensor([tokens, positions])
        return Forward(grid[0].view(-1, 1), grid[1].view(-1, 1), slot_tensor, max(positions) + 1, B)

    def _plan_prefill(self, requests: List[Request], rows: Rows) -> Optional[Forward]:
        chosen: List[Tuple[Request, int]] = []  # (request, tokens of its prompt this step)
        T = 0
        for r in requests:
            t = min(len(r.prompt) - r.filled, self.prefill_chunk)
            if chosen and (len(chosen) + 1) * max(T, t) > self.prefill_chunk:
                break
            chosen.append((r, t))
            T = max(T, t)
        if not chosen:
            return None
        S = self.max_seq_len
        tokens = [r.prompt[r.filled : r.filled + t] + [0] * (T - t) for r, t in chosen]  # right-padded
        # Pad positions run past the row's prompt: slots there are rewritten before they are ever read.
        positions = [[min(r.filled + j, S - 1) for j in range(T)] for r, _ in chosen]
        select_rows, select_cols = [], []
        for i, (r, t) in enumerate(chosen):
            completes = r.filled + t == len(r.prompt)
            if r.prompt_stats:
                cols = range(t)  # every prompt position's prediction
            elif completes and r.max_new > 0:
                cols = [t - 1]  # the first new token's
            else:
                cols = []
            select_rows += [i] * len(cols)
            select_cols += list(cols)
            rows.append((r, t))
        slots = [r.slot for r, _ in chosen]
        select = (self._tensor(select_rows), self._tensor(select_cols)) if select_rows else None
        return Forward(self._tensor(tokens), self._tensor(positions),
                       None if slots == list(range(len(slots))) else self._tensor(slots),
                       kv_len=max(r.filled + t for r, t in chosen), rows=len(chosen), select=select)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def compile_all(self) -> int:
        """(every rank alike, while no request runs) Compile the decode step for every bucket of rows and
        of keys now, rather than on first use in the middle of other requests' steps; returns how many.
        Each runs once on pad rows, which write only at the last position (see _plan_decode)."""
        if self.model.compiled is None:
            return 0
        with self._lock:
            if self._busy():
                raise RuntimeError("compile_all runs before any request: requests are running")
        S = self.max_seq_len
        lengths = sorted({kv_bucket(n, S) for n in range(1, S + 1)})
        for kv_len in lengths:
            for rows in self._buckets:
                # made as a step makes them (outside inference mode), so that the step finds the same graph
                grid = self._tensor([[0] * rows, [S - 1] * rows, list(range(rows))])
                with torch.inference_mode():
                    self.model.compiled(grid[0].view(-1, 1), grid[1].view(-1, 1), grid[2], kv_len)
        return len(lengths) * len(self._buckets)

    @torch.inference_mode()
    def _run(self, plan: Plan) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(every rank, no lock) The step's forwards: decode logits (rows, vocab) and the selected prefill
        positions' logits (N, vocab)."""
        decode_logits = prefill_logits = None
        if plan.decode is not None:
            d = plan.decode
            forward = self.model.compiled if d.compiled else self.model
            decode_logits = forward(d.tokens, d.positions, d.slots, d.kv_len)[: d.rows, 0]
        if plan.prefill is not None:
            p = plan.prefill
            h = self.model.hidden(p.tokens, p.positions, p.slots, p.kv_len)
            if p.select is not None:
                prefill_logits = self.model.logits(h[p.select])
        return decode_logits, prefill_logits

    def _sample(self, rows: Rows, decode_logits: Optional[torch.Tensor],
                prefill_logits: Optional[torch.Tensor]) -> Tuple[Results, List[Request]]:
        """(rank 0, no lock) Tokens for every row that needs one, prompt statistics, and the requests whose
        logits nothing can be sampled from."""
        results = Results()
        sampled: List[Tuple[Request, torch.Tensor]] = []  # (request, its logits)
        decoded = iter(decode_logits if decode_logits is not None else [])
        offset = 0  # into prefill_logits, which holds the selected positions in row order
        for r, t in rows:
            if t is None:
                sampled.append((r, next(decoded)))
                continue
            filled = r.filled + t
            results.filled.append((r.id, filled))
            if r.prompt_stats:
                logits, offset = prefill_logits[offset : offset + t], offset + t
                results.prompt.append((r.id, *_prompt_stats(logits, r.prompt[r.filled + 1 : filled + 1])))
                last = logits[t - 1]
            elif filled == len(r.prompt) and r.max_new > 0:
                last, offset = prefill_logits[offset], offset + 1
            if filled == len(r.prompt) and r.max_new > 0:
                sampled.append((r, last))
        if not sampled:
            return results, []
        reqs = [r for r, _ in sampled]
        only_decode = decode_logits is not None and len(sampled) == len(decode_logits)
        logits = decode_logits if only_decode else torch.stack([row for _, row in sampled])  # (R, vocab)
        # Logits holding NaN or +inf, or nothing above -inf, are exactly those whose max is not finite
        # (max propagates NaN). Sampling must not see them; their requests fail.
        peak, tokens = logits.max(dim=-1)  # the max is the greedy token's logit
        if any(r.temperature > 0 for r in reqs):
            logits = logits.masked_fill(~peak.isfinite()[:, None], 0.0)
            tokens = sample(logits, [r.temperature for r in reqs], [r.top_p for r in reqs], [r.top_k for r in reqs],
                            [r.generator for r in reqs])
        # One host sync for tokens and peaks together (token ids are exact in float32).
        host_tokens, peaks = torch.stack([tokens.float(), peak.float()]).tolist()
        lps: List[Optional[float]] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.logprobs]
        if want:
            index = torch.tensor(want, device=logits.device)
            chosen = F.log_softmax(logits[index], dim=-1).gather(-1, tokens[index][:, None]).squeeze(-1)
            for i, lp in zip(want, chosen.tolist()):
                lps[i] = lp
        bad = []
        for r, t, p, lp in zip(reqs, host_tokens, peaks, lps):
            if math.isfinite(p):
                results.tokens.append((r.id, int(t), lp))
            else:
                bad.append(r)
        return results, bad

    def _apply(self, results: Results) -> None:
        """(lock held, every rank) Record a step's results in the requests they name."""
        changed = set()
        for i, filled in results.filled:
            r = self._by_id.get(i)
            if r is not None:
                r.filled = filled
        for i, lps, greedy in results.prompt:
            r = self._by_id.get(i)
            if r is not None:
                r.prompt_logprobs += lps
                r.prompt_greedy += greedy
                if r.filled == len(r.prompt) and r.max_new == 0:
                    self._end(r, "length")
                changed.add(r)
        for i, token, lp in results.tokens:
            r = self._by_id.get(i)
            if r is not None:
                if r.first_token_at is None:
                    self._record_ttft(r)
                n = len(r.tokens)
                r.add(token, lp)
                self.stats.generated_tokens += len(r.tokens) - n
                changed.add(r)
        for i, message in results.failed:
            r = self._by_id.get(i)
            if r is not None:
                self._end(r, "error", LogitsError(message))
                changed.add(r)
        for r in changed:
            if r.done:
                self._end(r, r.finish_reason, r.error)  # which tells its waiter
            elif r.follow and r.waiter is not None:
                r.waiter.notify_all()

    def _record_ttft(self, r: Request) -> None:
        ttft = self.stats.ttft_seconds
        ttft.append(time.perf_counter() - r.submitted_at)
        if len(ttft) > _TTFT_KEPT:
            del ttft[: len(ttft) - _TTFT_KEPT]

    def _end(self, r: Request, reason: str, error: Optional[BaseException] = None) -> None:
        """(lock held) Finish `r` if it is not yet, free its slot, tell its waiter."""
        r.finish(reason, error)
        if self._by_id.pop(r.id, None) is not None:
            self.stats.requests_finished += 1
        if r.slot is not None and self._slots[r.slot] is r:
            self._slots[r.slot] = None
        if r.waiter is not None:
            r.waiter.notify_all()

    def _step_failed(self, rows: Rows, error: BaseException) -> None:
        """(lock held) A step raised. Alone, its rows fail with the error and the others go on; under model
        parallelism the ranks may no longer agree, so the engine stops and the error propagates."""
        for r, _ in rows:
            self._end(r, "error", error)
        if self.mp_size > 1 or not isinstance(error, Exception):
            self._stopped = f"a step failed: {type(error).__name__}: {error}"
            for r in list(self._waiting) + [r for r in self._slots if r is not None]:
                self._end(r, "error", error)
            self._waiting.clear()
            raise error
        log.error("a step failed; its %d request(s) get the error: %s: %s", len(rows), type(error).__name__, error)

    def _fail_pending(self) -> None:
        """(lock held) After a stop, end whatever a waiter still waits for."""
        for r in list(self._by_id.values()):
            self._end(r, "error", EngineStopped(self._stopped))

    def _wake_waiters(self) -> None:
        """(lock held) Wake every waiting call, so one of them takes over driving."""
        for r in list(self._by_id.values()) + list(self._waiting):
            if r.waiter is not None:
                r.waiter.notify_all()
        self._wake.notify_all()

    # Model parallelism: rank 0's plans and results, broadcast on a gloo group.

    def _broadcast(self, obj) -> None:
        dist.broadcast_object_list([_to_cpu(obj)], src=self._src, group=self._group)

    def _receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=self._src, group=self._group)
        return _to_device(box[0], self.device)


def kv_bucket(n: int, max_seq_len: int) -> int:
    """The keys a compiled decode step reads when the furthest row needs n: a power of two, at least
    MIN_KV_BUCKET, at most max_seq_len. Reading the whole cache instead would cost a step as much
    attention at its first token as at its last (at max_seq_len 2048, most of a small model's step)."""
    return min(max_seq_len, max(MIN_KV_BUCKET, 1 << (n - 1).bit_length()))


def _buckets(max_batch_size: int) -> List[int]:
    """Row counts a compiled decode step is compiled for: powers of two, and max_batch_size."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def _control_group() -> Tuple[object, int]:
    """A gloo group of this rank's model-parallel ranks, and the global rank of its rank 0. Every rank
    creates every group (new_group is collective), in the same order."""
    mp = fs_init.get_model_parallel_world_size()
    mine = dist.get_process_group_ranks(fs_init.get_model_parallel_group())
    group = None
    for start in range(0, dist.get_world_size(), mp):
        ranks = list(range(start, start + mp))
        g = dist.new_group(ranks, backend="gloo", timeout=_IDLE_TIMEOUT)
        if ranks == mine:
            group = g
    if group is None:
        raise RuntimeError(f"model-parallel ranks {mine} are not consecutive: cannot set up the engine's group")
    return group, mine[0]


def _to_cpu(obj):
    """A plan or results with its tensors on the CPU, for pickling."""
    if isinstance(obj, Plan):
        return Plan(*(None if f is None else _forward_to(f, "cpu") for f in (obj.decode, obj.prefill)), obj.shutdown)
    return obj


def _to_device(obj, device: torch.device):
    if isinstance(obj, Plan):
        return Plan(*(None if f is None else _forward_to(f, device) for f in (obj.decode, obj.prefill)), obj.shutdown)
    return obj


def _forward_to(f: Forward, device) -> Forward:
    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    select = None if f.select is None else (move(f.select[0]), move(f.select[1]))
    return Forward(move(f.tokens), move(f.positions), move(f.slots), f.kv_len, f.rows, select, f.compiled)


def _prompt_stats(logits: torch.Tensor, targets: List[int]) -> Tuple[List[float], List[bool]]:
    """Log-probability and greedy flag of each target token under the logits (one row per target; rows
    beyond the targets, the prediction after the whole prompt, are ignored)."""
    n = len(targets)
    target = torch.tensor(targets, device=logits.device)
    lp = F.log_softmax(logits[:n], dim=-1).gather(-1, target[:, None]).squeeze(-1)
    greedy = logits[:n].argmax(-1) == target
    return lp.tolist(), greedy.tolist()
