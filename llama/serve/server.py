"""Running the app: rank 0's HTTP server (listening while the model loads), its stop on a signal, and a
server in a background thread for Python programs and tests.

A stop (SIGINT, SIGTERM, or `RunningServer.stop`) first shuts the engine down, so that the open
streams end at once, each with a finish_reason, and the other ranks return; uvicorn then closes
the connections, waiting at most `GRACE_S` for the last ones.

Slow senders cannot hold connections: a request's head must arrive within `header_timeout_s` and its
body within `body_timeout_s` of the head (else 408, and the connection closes), and beyond
`max_connections` open connections a new one gets a 503 and is closed (`GuardedH11`).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from typing import Optional, Sequence, Union

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llama.generation import Llama
from llama.pool import ModelPool
from llama.serve.app import ServeConfig, create_app
from llama.serve.errors import APIError
from llama.serve.service import STREAM_INTERVAL_S, Service

log = logging.getLogger(__name__)

GRACE_S = 3  # seconds uvicorn waits for connections to close after a stop


class Server(uvicorn.Server):
    """uvicorn's server, whose SIGINT/SIGTERM handler also stops the engine (in a thread: a signal
    handler must not wait for the engine's lock), and which does not re-raise the signal once it has
    stopped (uvicorn would, and the process would then die of it instead of exiting 0)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        service.on_failure.append(self.exit)
        self._on_shutdown = getattr(getattr(config.app, "state", None), "on_shutdown", [])

    def handle_exit(self, sig, frame) -> None:
        if not self.service.stopping:
            log.info("stopping: no new requests; the ones in flight end now")
            threading.Thread(target=self.service.stop, name="llama-stop", daemon=True).start()
        super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()

    def exit(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        for callback in self._on_shutdown:  # e.g. the page's long-lived streams, which would hold the exit up
            callback()
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or an OSError that names them."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --host or --port") from None
    return sock


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the limits uvicorn lacks: a deadline for each request's head and
    one for its body (none for the response: a stream may run long), and a bound on open connections.
    Subclasses set the three limits (`guarded`)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer, self._waiting_for = None, None
        if len(self.connections) > self.max_connections:
            log.info("refused a connection: %d are open, the limit is %d", len(self.connections) - 1,
                     self.max_connections)
            self._refuse(APIError(503, f"the server has {self.max_connections} connections open, its limit: retry "
                                  "shortly", code="too_many_connections", type="server_error",
                                  headers={"Retry-After": "1"}))
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event) -> None:
        self._cancel()  # the connection is the websocket protocol's from now on
        super().handle_websocket_upgrade(event)

    def _watch(self) -> None:
        """Arm the deadline of what the connection waits for from the client: a head, or the rest of a body."""
        if self.transport.is_closing():
            return self._cancel()
        state = self.conn.their_state
        waiting_for = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if waiting_for == self._waiting_for:
            return
        self._cancel()
        if waiting_for is not None:
            delay = self.header_timeout_s if waiting_for == "head" else self.body_timeout_s
            self._timer, self._waiting_for = self.loop.call_later(delay, self._expired, waiting_for), waiting_for

    def _cancel(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
        self._timer, self._waiting_for = None, None

    def _expired(self, what: str) -> None:
        self._timer, self._waiting_for = None, None
        if self.transport.is_closing():
            return
        limit = self.header_timeout_s if what == "head" else self.body_timeout_s
        log.info("closed a connection whose request %s took over %g s to arrive", what, limit)
        if what == "body":
            if self.cycle.response_started:  # the app answers already: no second response
                self.transport.close()
                return
            self.cycle.disconnected = True  # the app, waiting for the body, reads a disconnect and answers nothing
            self.cycle.message_event.set()
        self._refuse(APIError(408, f"the request {what} took over {limit:g} s to arrive: send it at once",
                              code="request_timeout"))

    def _refuse(self, error: APIError) -> None:
        """Answer `error` outside the request cycle (none has started, or it was ended) and close."""
        body = json.dumps(error.body()).encode()
        head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close",
                *(f"{k}: {v}" for k, v in (error.headers or {}).items())]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.transport.close()


def guarded(config: ServeConfig) -> type:
    """GuardedH11 with `config`'s limits."""
    return type("GuardedH11", (GuardedH11,), {"header_timeout_s": config.header_timeout_s,
                                              "body_timeout_s": config.body_timeout_s,
                                              "max_connections": config.max_connections})


def uvicorn_config(app, config: ServeConfig, log_level: str = "info") -> uvicorn.Config:
    # log_config=None: uvicorn's loggers go to the process's own logging setup (rank 0: INFO). Its access
    # log names the method, path and status of each request, never a body.
    return uvicorn.Config(app, log_config=None, log_level=log_level, timeout_graceful_shutdown=GRACE_S,
                          lifespan="on", http=guarded(config))


def serve_rank0(service: Service, config: ServeConfig, sock: socket.socket,
                preload: Optional[Sequence[str]] = None) -> None:
    """Answer on `sock` at once (503 while the models that load at start load, in a thread), serve until a
    signal. Raises what a load at start raised; SystemExit(1) if an engine failed (e.g. a rank died)."""
    server = Server(uvicorn_config(create_app(service, config), config), service)
    loaded = threading.Event()
    errors = []

    def load() -> None:
        try:
            service.start(preload)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            if not service.stopping:  # a stop during the loads ends them: that is no error
                errors.append(e)
                server.exit()
            loaded.set()
            return
        if not service.stopping:
            host, port = sock.getsockname()[:2]
            names = ", ".join(service.pool.names)
            log.info("ready: %s on http://%s:%d (the page at /, the OpenAI API at /v1)", names, host, port)
        loaded.set()

    loading = threading.Thread(target=load, name="llama-load", daemon=True)
    loading.start()
    server.run(sockets=[sock])
    service.stop()
    if not loaded.is_set() and not errors:
        # An interpreter that exits under a thread still in torch's C++ aborts; and under model parallelism the
        # other ranks end only once the pool has stopped, after the load under way.
        log.info("stopped while a model was loading: exiting once the load ends")
        loading.join()
    if errors:
        raise errors[0]
    if service.failure is not None:
        raise SystemExit(1)


class RunningServer:
    """A server on a background thread of this process (`serve_in_thread`); `stop` ends it."""

    def __init__(self, server: Server, thread: threading.Thread, url: str):
        self._server, self._thread, self.url = server, thread, url
        self.service = server.service

    def stop(self, timeout: float = 10.0) -> None:
        self.service.stop()
        self._server.exit()
        self._thread.join(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(models: Union[Llama, ModelPool], host: str = "127.0.0.1", port: int = 0,
                    config: Optional[ServeConfig] = None, model_name: str = "llama", max_queue: int = 256,
                    stream_interval: float = STREAM_INTERVAL_S, timeout: float = 60.0) -> RunningServer:
    """Serve `models` (model-parallel size 1) from a background thread, once it answers: one Llama, named
    `model_name`, or a ModelPool of several (those that load at start loaded first). No signal handlers."""
    pool = models if isinstance(models, ModelPool) else ModelPool(loaded={model_name: models})
    service = Service(pool, max_queue, stream_interval)
    config = config or ServeConfig()
    server = Server(uvicorn_config(create_app(service, config), config, log_level="warning"), service)
    sock = bind(host, port)
    service.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llama-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            service.stop()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    host, port = sock.getsockname()[:2]
    return RunningServer(server, thread, f"http://{host}:{port}")
