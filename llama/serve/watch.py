"""Following engine requests from an asyncio event loop, without a thread per request.

The engine calls each request's `on_change` from its own thread after a step (llama.generation.
Llama.submit). A `Pump` turns the calls of one step into a single wake-up of the event loop (and
in mid-stream, at most one per interval), and a `Watch` (the completions of one HTTP request or
page event) then reads what each got with `Completion.poll`. A poll returns everything since the
last one, so when the loop wakes less often than the engine steps, or falls behind it, a stream
sends fewer, larger chunks instead of queueing one per token.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import AsyncIterator, Callable, List, NamedTuple, Optional

from llama.generation import Completion, Delta

log = logging.getLogger(__name__)


class Pump:
    """Wakes the watches of one event loop that the engine changed: once per burst of changes, and for
    the text in the middle of a stream at most once per `interval` seconds.

    Each wake-up costs the loop some work per changed stream, and the loop shares the interpreter
    lock with the engine's thread: for a small model, waking on every step would slow the steps
    themselves. With an interval, the text of the steps in between arrives in one chunk. Urgent
    changes (a stream's first output, a request's end) wake their watch at once, so that neither
    the time to first token nor a request's end waits for the interval.
    """

    _pumps: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pump]" = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0):
        self.loop = loop
        self.interval = interval
        self._guard = threading.Lock()
        self._changed: set = set()  # woken at the next interval
        self._urgent: set = set()  # woken at once
        self._scheduled = self._hurrying = False  # a wake-up of either kind is on its way
        self._last = float("-inf")  # the loop's time at the last interval wake-up

    @classmethod
    def of_running_loop(cls, interval: float = 0.0) -> "Pump":
        loop = asyncio.get_running_loop()
        pump = cls._pumps.get(loop)
        if pump is None:
            pump = cls._pumps[loop] = cls(loop, interval)
        pump.interval = interval
        return pump

    def notify(self, watch: "Watch", urgent: bool) -> None:
        """(the engine's thread, its lock held) `watch` changed. Must never raise into the engine."""
        try:
            with self._guard:
                if urgent:
                    self._urgent.add(watch)
                    if self._hurrying:
                        return
                    self._hurrying, callback = True, self._wake_urgent
                else:
                    self._changed.add(watch)
                    if self._scheduled:
                        return
                    self._scheduled, callback = True, self._schedule
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody is left to read the request
            pass

    def _schedule(self) -> None:
        delay = self._last + self.interval - self.loop.time()
        if delay > 0:
            self.loop.call_later(delay, self._wake)
        else:
            self._wake()

    def _wake(self) -> None:
        self._last = self.loop.time()
        with self._guard:
            changed, self._changed, self._scheduled = self._changed, set(), False
        for watch in changed:
            watch.event.set()

    def _wake_urgent(self) -> None:
        with self._guard:
            urgent, self._urgent, self._hurrying = self._urgent, set(), False
        for watch in urgent:
            watch.event.set()


class Change(NamedTuple):
    """What one completion of a watch got: its index, new output (or None) and, once done, why."""

    index: int
    delta: Optional[Delta]
    finish_reason: Optional[str]


class Watch:
    """Completions submitted together (a request's prompts and choices), followed from the event loop.

    `submit` is called once per completion with the `on_change` callback to pass to Llama.submit. If
    one submit raises, the completions already submitted are cancelled and the error propagates.
    `on_finish` is called with each completion seen to end; `interval` is the Pump's. A watch that is
    not a `stream` is only woken when a completion ends.
    """

    def __init__(self, submits: List[Callable[[Callable[[], None]], Completion]],
                 on_finish: Optional[Callable[[Completion], None]] = None, interval: float = 0.0,
                 stream: bool = True):
        self.event = asyncio.Event()
        self._on_finish = on_finish
        self._stream = stream
        self._started = False  # a change was read: later text may wait for the interval
        self.failure: Optional[BaseException] = None  # the engine died under it (`fail`)
        self.pump = pump = Pump.of_running_loop(interval)
        self.completions: List[Completion] = []
        # The engine's callbacks hold the watch weakly: a strong hold would make a cycle (watch, completion, its
        # request, the callback) that keeps the model alive after an unload until a garbage collection.
        me = weakref.ref(self)

        def on_change(i: int) -> None:
            watch = me()
            if watch is not None:
                watch._changed(pump, i)

        try:
            for i, submit in enumerate(submits):
                self.completions.append(submit(lambda i=i: on_change(i)))
        except BaseException:
            self.cancel()
            raise

    def _changed(self, pump: Pump, i: int) -> None:
        """(the engine's thread) Completion i changed: wake at once for a first output or an end; a whole
        (not streamed) answer only for ends."""
        done = i >= len(self.completions) or self.completions[i].finish_reason is not None
        if done or self._stream:
            pump.notify(self, urgent=done or not self._started)

    async def changes(self) -> AsyncIterator[Change]:
        """Each completion's output as it arrives, until all of them are done."""
        open_ = list(range(len(self.completions)))
        while open_:
            await self.event.wait()
            self.event.clear()
            if self.failure is not None:
                for i in open_:
                    yield Change(i, None, "error")
                return
            for i in list(open_):
                c = self.completions[i]
                reason = c.finish_reason  # read before the poll: once set, the poll gets everything left
                delta = c.poll()
                if delta is not None or reason is not None:
                    self._started = True
                    yield Change(i, delta, reason)
                if reason is not None:
                    open_.remove(i)
                    self._finished(c)

    async def wait(self) -> List[Completion]:
        """Until every completion is done."""
        while not all(c.finish_reason is not None for c in self.completions) and self.failure is None:
            await self.event.wait()
            self.event.clear()
        for c in self.completions:
            c.poll()  # under the engine's lock: the request's final text is settled just after its finish_reason
            self._finished(c)
        return self.completions

    def _finished(self, c: Completion) -> None:
        if self._on_finish is not None:
            self._on_finish(c)

    def error(self, index: int) -> Optional[BaseException]:
        """Why completion `index` failed: the engine's death, or the request's own error."""
        if self.failure is not None:
            return self.failure
        try:
            self.completions[index].wait()  # done already: returns at once, raising the request's error
        except Exception as e:  # noqa: BLE001 - handed to the caller
            return e
        return None

    def fail(self, error: BaseException) -> None:
        """(the loop's thread) The engine stopped for good: the completions still open end with `error`."""
        self.failure = error
        self.event.set()

    def cancel(self) -> None:
        """Stop the completions still running (a client gone, a stream closed): their slots are freed at
        the next step."""
        for c in self.completions:
            if c.finish_reason is None:
                c.cancel()
