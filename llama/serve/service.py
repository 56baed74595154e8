"""The models behind the server: their names, admission, the watches of what runs, and stopping.

The models live in a llama.pool.ModelPool: each on an engine of its own, loaded at start or (with a
budget) on first use. A request names a model, or an adapter (`NAME`, or `BASE:NAME`) on one; it is
admitted here: 404 for a name not served, 503 while the server starts or after a stop, a wait while
its model loads (every other model serving meanwhile), 429 when `max_queue` requests already wait
for a slot of that model, 400 for what the engine refuses; else it is submitted to its model's
engine, so concurrent users of one model share its batches.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
import threading
from typing import Callable, Dict, List, Optional, Tuple

from llama.engine import EngineStopped, QueueFull
from llama.generation import Completion, Llama
from llama.pool import Lease, ModelPool
from llama.serve.errors import APIError, invalid
from llama.serve.metrics import Metrics
from llama.serve.params import Sampling
from llama.serve.watch import Watch

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 or 503 asks the client to wait
# A stream's chunks come at most this often (watch.Pump): 50 a second reads as smooth, and for a small model
# it keeps the event loop from slowing the engine's steps. Steps slower than this stream every token.
STREAM_INTERVAL_S = 0.02


class Admitted:
    """A request's model, held loaded while the request is being submitted (`with` it): the Llama, the adapter
    (None: the base) and the name the answer reports."""

    def __init__(self, lease: Lease, adapter: Optional[str], model: str):
        self.lease, self.adapter, self.model = lease, adapter, model
        self.llama: Llama = lease.llama

    @property
    def base(self) -> str:
        return self.lease.name

    def release(self) -> None:
        self.lease.release()

    def __enter__(self) -> "Admitted":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Service:
    """The models served: `start` loads what must load at start, `admit` and `watch` requests, `stop`.
    `failure` is set when an engine's thread died (a rank gone, a bug): then every request is refused and
    the server goes down."""

    def __init__(self, pool: ModelPool, max_queue: int = 256, stream_interval: float = STREAM_INTERVAL_S):
        self.pool = pool
        self.default = pool.names[0]  # the model of a request that names none
        self.max_queue = max_queue
        self.stream_interval = stream_interval  # seconds between a stream's chunks, at least (see watch.Pump)
        self.created = int(time.time())
        self.metrics = Metrics(pool)
        self.failure: Optional[BaseException] = None  # why an engine stopped on its own
        self.stopping = False
        self.started = False  # the models that load at start have
        self.on_failure: List[Callable[[], None]] = []  # e.g. ending the HTTP server
        pool.on_failure = self._failed
        self._watches: "weakref.WeakSet[Watch]" = weakref.WeakSet()  # what is in flight
        self._watches_lock = threading.Lock()  # added to from the loop, read from an engine's thread
        self._admin: Optional[asyncio.Lock] = None  # adapter loads and unloads, one at a time

    # What is served.

    @property
    def model_name(self) -> str:
        """The default model: the first named."""
        return self.default

    @property
    def llama(self) -> Optional[Llama]:
        """The default model, if loaded."""
        return self.pool.loaded().get(self.default)

    @property
    def ready(self) -> bool:
        return self.started and not self.stopping and self.failure is None

    def adapters(self) -> Dict[str, Tuple[str, str]]:
        """Every adapter served: {name: (base, folder)}."""
        return {adapter: (base, path) for base in self.pool.names for adapter, path in self.pool.adapters(base).items()}

    def choices(self) -> List[str]:
        """What a request may name: every model, then every adapter."""
        return list(self.pool.names) + sorted(self.adapters())

    def description(self, name) -> str:
        """The sentence a model's users should read (a demo's gibberish), or ''."""
        try:
            base, _ = self.resolve(name)
        except APIError:
            return ""
        spec = self.pool.spec(base)
        return spec.description if spec is not None else ""

    def max_seq_len(self, base: str) -> int:
        generator = self.pool.loaded().get(base)
        return generator.max_seq_len if generator is not None else self.pool.spec(base).max_seq_len

    def resolve(self, name) -> Tuple[str, Optional[str]]:
        """(base model, adapter or None) of a request's `model`: a model's name, an adapter's, or BASE:ADAPTER;
        None is the default model. 404 for any other."""
        if name is None:
            return self.default, None
        if isinstance(name, str):
            if name in self.pool.names:
                return name, None
            adapters = self.adapters()
            base, colon, adapter = name.partition(":")
            if colon and base in self.pool.names and adapter in self.pool.adapters(base):
                return base, adapter
            if name in adapters:
                return adapters[name][0], name
        raise APIError(404, f"the model {_quote(name)} does not exist: this server serves {self.described()}",
                       param="model", code="model_not_found")

    def described(self) -> str:
        """The models and adapters served, in words."""
        models = ", ".join(repr(n) for n in self.pool.names)
        adapters = self.adapters()
        if not adapters:
            return models
        return models + "; adapters " + ", ".join(f"{a!r} (on {b!r})" for a, (b, _) in sorted(adapters.items()))

    # Starting and stopping.

    def start(self, preload=None) -> None:
        """Serve the models loaded already, and load those that load at start (every one without a budget);
        raises the first load's error."""
        self.pool.start(preload)
        self.started = True

    def _failed(self, error: BaseException) -> None:
        """(an engine's thread) An engine died: the requests in flight get an error, the server goes down."""
        self.failure = error
        with self._watches_lock:
            watches = list(self._watches)
        for watch in watches:  # the engine may have left them open
            try:
                watch.pump.loop.call_soon_threadsafe(watch.fail, error)
            except RuntimeError:  # that loop is closed
                pass
        for callback in self.on_failure:
            callback()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admitting; end the requests queued and running (finish_reason "cancelled"); let the other
        ranks return; wait for the engines' threads."""
        self.stopping = True
        self.pool.stop(timeout)

    # Admission.

    def check_open(self) -> None:
        """The 503 that says why no request is taken now, if none is."""
        if self.failure is not None:
            raise APIError(503, "a model worker stopped: the server is going down", code="engine_failed")
        if self.stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if not self.started:
            raise APIError(503, "the model is still loading: retry shortly", code="loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    async def admit(self, name=None) -> Admitted:
        """The model a request names, loaded (waiting for its load if it is not: other models serve meanwhile),
        and held until the request is submitted; else the error that says why not."""
        base, adapter = self.resolve(name)
        while True:
            self.check_open()
            lease = self.pool.lease(base)
            if lease is not None:
                break
            try:
                await asyncio.wrap_future(self.pool.load(base))
            except Exception as e:  # noqa: BLE001 - the load's own error, for the client
                self.check_open()
                log.error("model %r could not be loaded: %s: %s", base, type(e).__name__, e)
                raise APIError(500, f"the model {base!r} could not be loaded ({type(e).__name__}: {e}); the "
                               "server's log has the details", code="model_load_failed") from None
        if adapter is not None and adapter not in _loaded_adapters(lease.llama):
            lease.release()
            raise APIError(404, f"the adapter {adapter!r} of model {base!r} is not loaded: this server serves "
                           f"{self.described()}", param="model", code="model_not_found")
        return Admitted(lease, adapter, name if isinstance(name, str) else base)

    def watch(self, m: Admitted, prompts: List[List[int]], sampling: Sampling, max_new: List[int],
              decode_after: Optional[List[int]] = None) -> Watch:
        """Submit `sampling.n` choices of each prompt (choice k of prompt i seeded seed + i * n + k) to the
        admitted model: all of them, or none with the error."""
        generator = m.llama
        n = sampling.n
        room = generator.max_batch_size + self.max_queue
        if len(prompts) * n > room:  # could never be admitted: a 429's "retry later" would be a lie
            raise invalid(f"{len(prompts)} prompt(s) x n={n} make {len(prompts) * n} completions, more than this "
                          f"server holds at once ({generator.max_batch_size} running + {self.max_queue} waiting): "
                          "send fewer in one request", "prompt" if len(prompts) > 1 else "n")
        more = {} if m.adapter is None else {"adapter": m.adapter}

        def submit(i: int, k: int) -> Callable[[Callable[[], None]], Completion]:
            seed = None if sampling.seed is None else sampling.seed + i * n + k
            return lambda on_change: generator.submit(
                prompts[i], max_new[i], seed=seed, echo=sampling.echo, params=sampling.params,
                decode_after=decode_after, max_waiting=self.max_queue, on_change=on_change, **more)

        base = m.base
        try:
            watch = Watch([submit(i, k) for i in range(len(prompts)) for k in range(n)],
                          on_finish=lambda c: self.metrics.ttft(base, c.ttft), interval=self.stream_interval,
                          stream=sampling.stream)
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

    # Adapters at run time.

    async def load_adapter(self, name, path, base=None, replace: bool = False) -> str:
        """Load the PEFT adapter folder `path` as `name` (or BASE:NAME) on model `base` (default: the only
        model, or the one `name` names), loading the base first if it is not; returns the adapter's name.
        400 for what the library refuses (its checks of the folder against the base), the server serving on."""
        if not isinstance(name, str) or not name:
            raise invalid("lora_name must be a non-empty string: the name requests will use as their model",
                          "lora_name")
        if not isinstance(path, str) or not path:
            raise invalid("lora_path must be a non-empty string: the PEFT adapter folder on the server", "lora_path")
        if base is not None and not isinstance(base, str):
            raise invalid("base_model_name must be a model's name", "base_model_name")
        head, colon, tail = name.partition(":")
        if colon:
            if base is not None and base != head:
                raise invalid(f"lora_name {name!r} names model {head!r} but base_model_name is {base!r}: give one",
                              "lora_name")
            base, name = head, tail
        if base is None:
            owner = self.adapters().get(name)
            if owner is not None:
                base = owner[0]
            elif len(self.pool.names) == 1:
                base = self.default
            else:
                raise invalid(f"this server serves several models ({self.described()}): name the adapter's base, "
                              "as lora_name 'BASE:NAME' or with base_model_name", "lora_name")
        if base not in self.pool.names:
            raise APIError(404, f"the model {base!r} does not exist: this server serves {self.described()}",
                           param="base_model_name", code="model_not_found")
        if not name or ":" in name or name in self.pool.names:
            raise invalid(f"lora_name {name!r} must differ from every model's name and hold no ':' (models: "
                          f"{', '.join(repr(n) for n in self.pool.names)})", "lora_name")
        owner = self.adapters().get(name)
        if owner is not None and owner[0] != base:
            raise invalid(f"the adapter {name!r} is already loaded on model {owner[0]!r}: unload it first, or "
                          "choose another name", "lora_name")
        if owner is not None and not replace:
            raise invalid(f"the adapter {name!r} has already been loaded: unload it first, or send "
                          '"load_inplace": true to replace it', "lora_name")
        async with self._admin_lock():
            with await self.admit(base) as m:
                try:
                    await asyncio.to_thread(m.llama.load_adapter, name, os.fspath(path))
                except (ValueError, TypeError, OSError, MemoryError) as e:
                    raise invalid(f"the adapter {name!r} at {path!r} cannot be loaded on model {base!r}: {e}",
                                  "lora_path") from None
                except EngineStopped:
                    raise APIError(503, "the server is shutting down", code="shutting_down") from None
                except Exception as e:  # another rank's refusal (RankError) reads as the library's words
                    if type(e).__name__ != "RankError":
                        raise
                    raise invalid(f"the adapter {name!r} at {path!r} cannot be loaded on model {base!r}: {e}",
                                  "lora_path") from None
            self.pool.remember_adapter(base, name, os.fspath(path))
        log.info("adapter %r loaded on model %r", name, base)
        return name

    async def unload_adapter(self, name) -> str:
        """Unload adapter `name` (or BASE:NAME): new requests for it get 404, those running finish with it."""
        self.check_open()
        if not isinstance(name, str) or not name:
            raise invalid("lora_name must be a non-empty string", "lora_name")
        adapters = self.adapters()
        head, colon, tail = name.partition(":")
        if colon and head in self.pool.names and tail in self.pool.adapters(head):
            base, name = head, tail
        elif name in adapters:
            base = adapters[name][0]
        else:
            loaded = ", ".join(f"{a!r}" for a in sorted(adapters)) or "none"
            raise APIError(404, f"the adapter {name!r} is not loaded: the adapters served are {loaded}",
                           param="lora_name", code="adapter_not_found")
        async with self._admin_lock():
            lease = self.pool.lease(base)
            if lease is not None:  # loaded: out of the engine too; unloaded: it is only remembered
                with lease:
                    if name in _loaded_adapters(lease.llama):
                        await asyncio.to_thread(lease.llama.unload_adapter, name)
            self.pool.remember_adapter(base, name, None)
        log.info("adapter %r unloaded from model %r", name, base)
        return name

    def _admin_lock(self) -> asyncio.Lock:
        if self._admin is None:
            self._admin = asyncio.Lock()
        return self._admin


def _loaded_adapters(generator: Llama) -> Dict[str, str]:
    return dict(getattr(generator, "adapters", None) or {})


def _quote(name) -> str:
    return repr(name[:100]) if isinstance(name, str) else repr(name)[:100]


def _param_of(message: str) -> Optional[str]:
    """The request field a library error is about, from how its message begins."""
    for start, param in (("logit_bias", "logit_bias"), ("stop", "stop"), ("prompt", "prompt"),
                         ("the json_schema", "response_format"), ("the json_object", "response_format"),
                         ("the regex", "response_format"), ("the lark", "response_format"),
                         ("the gbnf", "response_format"), ("the constraint", "response_format")):
        if message.startswith(start):
            return param
    return None
