"""Limits on what one client can do: the request body's size (plain ASGI middleware, so streamed
responses pass untouched), and a back-off for clients that keep guessing the API key."""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Tuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama.serve.errors import APIError


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body declared (Content-Length) or found (chunked) larger than `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self._message())
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await APIError(413, self._message(), code="body_too_large").response()(scope, receive, send)


class Throttle:
    """A back-off per client address for wrong API keys and page logins: after `free` failures in a row,
    each further try is refused (429) until `first_s` seconds have passed, doubling with each failure up
    to `max_s`. A success starts the count again; a client quiet for `forget_s` is forgotten, and at most
    `max_clients` are remembered (the oldest go first), so the table stays small under a flood."""

    def __init__(self, free: int = 5, first_s: float = 1.0, max_s: float = 60.0, forget_s: float = 600.0,
                 max_clients: int = 10_000):
        self.free, self.first_s, self.max_s = free, first_s, max_s
        self.forget_s, self.max_clients = forget_s, max_clients
        self._lock = threading.Lock()
        self._clients: "OrderedDict[str, Tuple[int, float, float]]" = OrderedDict()  # failures, last, blocked until

    def wait_s(self, client: str) -> float:
        """Seconds `client` must still wait before its next try (0: it may try now)."""
        now = time.monotonic()
        with self._lock:
            entry = self._clients.get(client)
            if entry is not None and now - entry[1] > self.forget_s:
                del self._clients[client]
                return 0.0
            return 0.0 if entry is None else max(0.0, entry[2] - now)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            failures = self._clients.pop(client, (0, now, now))[0] + 1
            blocked = now if failures < self.free else now + min(self.max_s, self.first_s * 2 ** (failures - self.free))
            self._clients[client] = (failures, now, blocked)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


def too_many_failures(wait: float) -> APIError:
    seconds = math.ceil(wait)
    return APIError(429, f"too many wrong API keys or logins from this address: retry in {seconds} s",
                    code="too_many_failed_attempts", headers={"Retry-After": str(seconds)})


class LoginThrottle:
    """The page's login form (Gradio's POST /login) under a Throttle: a refused login (400) counts as a
    failure, an accepted one (200) as a success, and a client in its back-off gets a 429 without trying."""

    PATHS = ("/login", "/login/")

    def __init__(self, app: ASGIApp, throttle: Throttle):
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else ""
        wait = self.throttle.wait_s(client)
        if wait > 0:
            await too_many_failures(wait).response()(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 400:  # Gradio's "Incorrect credentials."
                    self.throttle.failed(client)
                elif message["status"] == 200:
                    self.throttle.succeeded(client)
            await send(message)

        await self.app(scope, receive, counted)
