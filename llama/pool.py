"""Several models in one process, each on an engine of its own, loaded on demand within a budget.

A `ModelPool` holds models by name. Each loaded model runs its engine's `serve_forever` in a thread of
its own, so requests to different models run side by side and never share a batch. With a budget
(`max_loaded` models, or `memory_bytes` of weights and KV cache), models load on first use, and when a
load would exceed it the least recently used idle model (no request queued or running) is unloaded
first, as Ollama does; the load waits for a model to turn idle if none is. Loads run one at a time in
a thread of the pool's own: a request that needs a model waits for it (`load` returns a future), and
every other model keeps serving meanwhile. Without a budget every model loads at `start`.

Under model parallelism every rank holds the same models and rank 0 decides. Its engines share one
StepChannel (llama.distributed) and take turns, each step whole; rank 0 also sends the pool's own
messages on it, tagged POOL: load, compile, unload, end. The other ranks run `follow`, one loop that
dispatches each message: a step to its model's engine, a load to a thread that builds the model beside
rank 0's (the build's agreements use the default process group, the steps fairscale's and the
channel's, so a load never stalls the other models' steps), an unload to dropping the model.

Loads run at a lower CPU priority than the engines (Linux), so that on a busy machine a load takes the
cores the serving models leave idle. Adapters (unmerged LoRA, `ModelSpec.adapters`) are loaded into a
model once it serves, on rank 0 only, through Llama.load_adapter: they travel to the other ranks with
its next step.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from llama.distributed import env_world_size, model_parallel, resolve_device, setup_model_parallel, shared_channel
from llama.generation import Llama

log = logging.getLogger(__name__)

POOL = "\0pool"  # the tag of the pool's own messages (no model may be named so: names are printable)
_IDLE_POLL_S = 0.05  # how often a load waiting for room checks whether a model turned idle


@dataclass
class ModelSpec:
    """How to build one model: Llama.build's keyword arguments, its unmerged LoRA adapters ({name: folder}),
    what is known before it loads: its context (max_seq_len) and the bytes it will hold (`estimate`), and
    a sentence for its users (`description`: e.g. that a demo model's text is gibberish)."""

    name: str
    build: Dict[str, object]
    adapters: Dict[str, str] = field(default_factory=dict)
    max_seq_len: int = 2048
    estimate: int = 0
    description: str = ""


class Lease:
    """A loaded model taken for one request (`ModelPool.lease`): it is not unloaded until the lease is given
    back (`release`, or the end of a `with` block), by which time the request is in its engine's queue."""

    def __init__(self, pool: "ModelPool", entry: "_Entry"):
        self._pool, self._entry = pool, entry
        self.name, self.llama = entry.name, entry.llama
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._entry)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(eq=False)
class _Entry:
    name: str
    spec: Optional[ModelSpec]  # None: a model given loaded, never unloaded
    llama: Optional[Llama] = None
    state: str = "unloaded"  # loading, loaded, unloading
    future: Optional[Future] = None  # the load asked for and not yet done
    leases: int = 0
    last_used: float = 0.0
    nbytes: int = 0  # measured once loaded; the spec's estimate before
    load_s: Optional[float] = None  # how long its last load took
    loads: int = 0
    thread: Optional[threading.Thread] = None  # its engine's serve_forever (rank 0)
    adapters: Dict[str, str] = field(default_factory=dict)  # loaded into it now


class ModelPool:
    """Models by name, loaded on demand within `max_loaded` and `memory_bytes` (None: no limit, and every model
    loads at `start`). Rank 0 calls `start`, then `lease`/`load` from any thread, and `stop`; the other ranks
    call `follow` instead. `on_failure` is called once if a model's engine dies (a rank gone)."""

    def __init__(self, specs: Sequence[ModelSpec] = (), max_loaded: Optional[int] = None,
                 memory_bytes: Optional[int] = None, loaded: Optional[Dict[str, Llama]] = None,
                 on_failure: Optional[Callable[[BaseException], None]] = None):
        names = [s.name for s in specs] + list(loaded or {})
        check_names(names)
        if max_loaded is not None and (not isinstance(max_loaded, int) or isinstance(max_loaded, bool)
                                       or max_loaded < 1):
            raise ValueError(f"max_loaded={max_loaded!r} must be an integer >= 1 (models loaded at once at most)")
        if memory_bytes is not None and not memory_bytes > 0:
            raise ValueError(f"the memory budget must be positive, not {memory_bytes!r} bytes")
        self.max_loaded, self.memory_bytes = max_loaded, memory_bytes
        if memory_bytes is not None and specs:
            largest = max(specs, key=lambda s: s.estimate)
            if largest.estimate > memory_bytes:
                raise ValueError(f"the memory budget of {_gib(memory_bytes)} is too small for model "
                                 f"{largest.name!r} alone, which needs about {_gib(largest.estimate)} (weights and "
                                 "KV cache): raise --memory_gb, or shrink the model (a 16-bit dtype, quantize, a "
                                 "smaller max_seq_len or max_batch_size)")
        self._entries: Dict[str, _Entry] = {s.name: _Entry(s.name, s, nbytes=s.estimate) for s in specs}
        for name, generator in (loaded or {}).items():
            from llama.loading import model_bytes

            self._entries[name] = _Entry(name, None, generator, "loaded", nbytes=model_bytes(generator.model),
                                         loads=1, adapters=_adapters_of(generator))
        self.on_failure = on_failure
        self.failure: Optional[BaseException] = None
        self._lock = threading.Condition()
        self._queue: List[str] = []  # loads asked for, in order
        self._loader: Optional[threading.Thread] = None
        self._stopping = False
        self._channel = None  # under model parallelism, the shared StepChannel
        self.mp_rank, self.mp_size = 0, 1

    @property
    def names(self) -> List[str]:
        return list(self._entries)

    @property
    def budget(self) -> bool:
        return self.max_loaded is not None or self.memory_bytes is not None

    def spec(self, name: str) -> Optional[ModelSpec]:
        return self._entries[name].spec

    # Set-up, on every rank.

    def _join(self) -> None:
        """Under model parallelism: the process group and the shared StepChannel, on every rank alike, before
        any model loads."""
        specs = [e.spec for e in self._entries.values() if e.spec is not None]
        if not specs:
            self.mp_rank, self.mp_size = model_parallel()
        else:
            build = specs[0].build
            mp = build.get("model_parallel_size") or env_world_size()
            if mp > 1:
                setup_model_parallel(mp, resolve_device(build.get("device")))
            self.mp_rank, self.mp_size = model_parallel()
        if self.mp_size > 1:
            self._channel = shared_channel()

    def start(self, preload: Optional[Sequence[str]] = None) -> None:
        """(rank 0) Serve the models given loaded, then load `preload` (default: every model without a budget,
        none with one), one after another; raises the first load's error."""
        self._join()
        for e in self._entries.values():
            if e.llama is not None and e.thread is None:
                self._serve(e)
        self._loader = threading.Thread(target=self._load_loop, name="llama-pool-loader", daemon=True)
        self._loader.start()
        if preload is None:
            preload = [] if self.budget else [n for n, e in self._entries.items() if e.llama is None]
        for name in preload:
            self.load(name).result()

    # Rank 0: using the models.

    def lease(self, name: str) -> Optional[Lease]:
        """The model `name` if it is loaded and serving (kept loaded until the lease is released), else None."""
        with self._lock:
            e = self._entries[name]
            if e.state != "loaded" or self._stopping:
                return None
            e.leases += 1
            e.last_used = time.monotonic()
            return Lease(self, e)

    def load(self, name: str) -> Future:
        """A future done when model `name` is loaded (at once if it is): its result is the Llama, its exception
        the load's error. Asking again while it loads gives the same future."""
        with self._lock:
            e = self._entries[name]
            if self._stopping:
                f: Future = Future()
                f.set_exception(RuntimeError("the models are being shut down"))
                return f
            if e.state == "loaded":
                f = Future()
                f.set_result(e.llama)
                return f
            if e.future is None:
                e.future = Future()
                self._queue.append(name)
                self._lock.notify_all()
            return e.future

    def loaded(self) -> Dict[str, Llama]:
        """The models loaded and serving now."""
        with self._lock:
            return {n: e.llama for n, e in self._entries.items() if e.state == "loaded"}

    def status(self) -> Dict[str, dict]:
        """Each model's state ("loaded", "loading", "unloading", "unloaded"), bytes (measured once loaded,
        estimated before), last load's seconds and number of loads."""
        with self._lock:
            return {n: {"state": e.state, "bytes": e.nbytes, "load_s": e.load_s, "loads": e.loads}
                    for n, e in self._entries.items()}

    def adapters(self, name: str) -> Dict[str, str]:
        """The unmerged adapters of model `name`: those loaded into it now, and, while it is unloaded, those
        it will get as it loads."""
        with self._lock:
            e = self._entries[name]
            return dict(e.adapters) if e.state == "loaded" or e.spec is None else dict(e.spec.adapters)

    def remember_adapter(self, name: str, adapter: str, path: Optional[str]) -> None:
        """Record that model `name` has (path) or no longer has (None) `adapter`, so that it gets it again
        whenever it reloads."""
        with self._lock:
            e = self._entries[name]
            for table in (e.adapters, e.spec.adapters if e.spec is not None else {}):
                if path is None:
                    table.pop(adapter, None)
                else:
                    table[adapter] = path

    def _release(self, e: _Entry) -> None:
        with self._lock:
            e.leases -= 1
            e.last_used = time.monotonic()
            self._lock.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """(rank 0) Shut every model down (their requests end "cancelled"), and let the other ranks' `follow`
        return."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._lock.notify_all()
            entries = list(self._entries.values())
        if self._loader is not None and self._loader is not threading.current_thread():
            self._loader.join(timeout if self.mp_size == 1 else None)  # a load under way ends first
        for e in entries:
            if e.llama is not None:
                e.llama.shutdown()
        for e in entries:
            if e.thread is not None and e.thread is not threading.current_thread():
                e.thread.join(timeout)
        if self._channel is not None and self.failure is None:
            self._send(("end",))

    # Rank 0: loading and unloading, in the loader's thread.

    def _load_loop(self) -> None:
        _lower_priority()
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    for name in self._queue:
                        e = self._entries[name]
                        e.future.set_exception(RuntimeError("the models are being shut down"))
                        e.future = None
                    self._queue.clear()
                    return
                name = self._queue.pop(0)
                e = self._entries[name]
            future = e.future
            try:
                self._make_room(e)
                self._load(e)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the model
                with self._lock:
                    e.future, e.state = None, "unloaded" if e.llama is None else e.state
                future.set_exception(exc)
                if self.failure is not None:
                    return
                continue
            with self._lock:
                e.future = None
            future.set_result(e.llama)

    def _fits(self, e: _Entry) -> bool:
        """(lock held) Whether `e` can load beside the models loaded now."""
        others = [o for o in self._entries.values() if o is not e and o.state != "unloaded"]
        if self.max_loaded is not None and len(others) + 1 > self.max_loaded:
            return False
        return self.memory_bytes is None or sum(o.nbytes for o in others) + e.nbytes <= self.memory_bytes

    def _make_room(self, e: _Entry) -> None:
        """Unload the least recently used idle models until `e` fits; wait for one to turn idle if none is."""
        while True:
            with self._lock:
                if self._stopping:
                    raise RuntimeError("the models are being shut down")
                if self._fits(e):
                    e.state = "loading"
                    return
                idle = [o for o in self._entries.values()
                        if o.state == "loaded" and o.spec is not None and o.leases == 0 and _idle(o.llama)]
                victim = min(idle, key=lambda o: o.last_used, default=None)
                if victim is None:
                    self._lock.wait(_IDLE_POLL_S)  # its requests end without telling the pool: look again soon
                    continue
                victim.state = "unloading"
            self._unload(victim, f"to make room for {e.name!r}")

    def _load(self, e: _Entry) -> None:
        from llama.loading import model_bytes

        start = time.perf_counter()
        log.info("loading model %r", e.name)
        self._send(("load", e.name))
        try:
            generator = _build(e.spec)
        except BaseException:
            self._send(("unload", e.name))  # whatever the other ranks built
            raise
        if e.spec.build.get("compile"):  # every rank, between other models' steps
            self._send(("compile", e.name), then=generator.compile_all)
        e.llama, e.nbytes = generator, model_bytes(generator.model)
        self._serve(e)
        adapters = dict(e.spec.adapters)
        e.adapters = {}
        for adapter, path in adapters.items():
            try:
                generator.load_adapter(adapter, path)
                e.adapters[adapter] = path
            except Exception as exc:  # noqa: BLE001 - the base serves on: checked at start, this is rare
                log.error("model %r: adapter %r from %s could not be loaded: %s", e.name, adapter, path, exc)
        with self._lock:
            e.state, e.loads, e.last_used = "loaded", e.loads + 1, time.monotonic()
            e.load_s = time.perf_counter() - start
        log.info("loaded model %r in %.2f s (%s)", e.name, e.load_s, _gib(e.nbytes))

    def _serve(self, e: _Entry) -> None:
        """Run `e`'s engine in a thread of its own, and return once it takes requests."""
        generator = e.llama
        generator.engine.tag = e.name if e.spec is not None else None
        ready = threading.Event()
        e.thread = threading.Thread(target=self._serve_forever, args=(e, generator, ready.set), daemon=True,
                                    name=f"llama-engine-{e.name}")
        e.thread.start()
        while not ready.wait(timeout=0.1):
            if not e.thread.is_alive():
                raise self.failure or RuntimeError(f"the engine of model {e.name!r} did not start")

    def _serve_forever(self, e: _Entry, generator: Llama, on_ready: Callable[[], None]) -> None:
        try:
            generator.serve_forever(on_ready=on_ready)
        except BaseException as exc:  # noqa: BLE001 - a rank died under model parallelism, or a bug
            log.error("the engine stopped (model %r): %s: %s; the requests in flight got an error", e.name,
                      type(exc).__name__, exc)
            with self._lock:
                first, self.failure = self.failure is None, self.failure or exc
            if first and self.on_failure is not None:
                self.on_failure(exc)

    def _unload(self, e: _Entry, why: str) -> None:
        log.info("unloading model %r %s", e.name, why)
        e.llama.shutdown()
        e.thread.join()
        self._send(("unload", e.name))
        with self._lock:
            e.llama, e.thread, e.state, e.nbytes = None, None, "unloaded", e.spec.estimate
        _free_memory()

    def _send(self, message: tuple, then: Optional[Callable[[], object]] = None) -> None:
        """(rank 0) Tell the other ranks `message`, between two engine steps; run `then` inside that turn."""
        if self._channel is None:
            if then is not None:
                then()
            return
        with self._channel.turn:
            self._channel.send((POOL, message))
            if then is not None:
                then()

    # The other ranks.

    def follow(self) -> None:
        """(ranks > 0) Run rank 0's loads, steps and unloads until it stops the pool. Raises if rank 0 is gone."""
        self._join()
        if self._channel is None:
            raise RuntimeError("follow is for the ranks above 0 under model parallelism")
        models: Dict[str, Llama] = {}
        loads: Dict[str, Future] = {}

        def model(name: str) -> Llama:
            if name not in models:  # rank 0 built it: this rank's build of it ends about now
                models[name] = loads.pop(name).result()
            return models[name]

        for e in self._entries.values():
            if e.llama is not None:
                models[e.name] = e.llama
        while True:
            tag, message = self._channel.receive()
            if tag != POOL:
                model(tag).engine.follow_step(message)
                continue
            kind, name = message[0], message[1] if len(message) > 1 else None
            if kind == "end":
                for pending in loads.values():  # rank 0 gave them up: let their builds end before this rank does
                    pending.exception()
                return
            if kind == "load":
                loads[name] = _build_in_thread(self._entries[name].spec)
            elif kind == "compile":
                model(name).compile_all()
            elif kind == "unload":
                models.pop(name, None)
                pending = loads.pop(name, None)
                if pending is not None:
                    pending.exception()  # a load rank 0 gave up on: wait for it to end here too
                _free_memory()


def check_names(names: Sequence[str]) -> None:
    """Model names: printable, without ':' (which joins a model and an adapter), each once."""
    seen = set()
    for name in names:
        if not isinstance(name, str) or not name or not name.isprintable() or ":" in name or len(name) > 256:
            raise ValueError(f"model name {name!r} must be 1 to 256 printable characters without ':'")
        if name in seen:
            raise ValueError(f"two models are named {name!r}: give each model a name of its own")
        seen.add(name)


def _build(spec: ModelSpec) -> Llama:
    generator = Llama.build(**spec.build)
    generator.engine.tag = spec.name
    return generator


def _build_in_thread(spec: ModelSpec) -> Future:
    """(ranks > 0) Build `spec` in a thread, beside rank 0's build of it; the future holds the Llama, or the error
    every rank got."""
    future: Future = Future()

    def run() -> None:
        _lower_priority()
        try:
            future.set_result(_build(spec))
        except BaseException as e:  # noqa: BLE001 - rank 0 reports it; this rank waits for rank 0's next word
            future.set_exception(e)

    threading.Thread(target=run, name=f"llama-load-{spec.name}", daemon=True).start()
    return future


LOAD_NICENESS = 10  # how much lower than the engines' the loads' CPU priority is (Linux: a thread's own nice value)


def _lower_priority() -> None:
    """Give this thread, and the threads it starts (torch's intra-op team included), a lower CPU priority: a
    load then takes the cores the engines leave idle, rather than slowing their steps."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)  # Linux: per thread
    except (AttributeError, OSError):  # another OS, or not permitted: loads run at the engines' priority
        pass


def _idle(generator: Llama) -> bool:
    return generator.engine.pending() == (0, 0)


def _adapters_of(generator: Llama) -> Dict[str, str]:
    return dict(getattr(generator, "adapters", None) or {})


def _free_memory() -> None:
    """Give an unloaded model's memory back. Its tensors went with the last reference to it (no cycle holds them:
    tests/test_serve_models.py checks), so no gc.collect(), which would hold the interpreter lock, and so every
    other model's steps, for a fifth of a second or more."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gib(n: Union[int, float]) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
