"""Running the app: rank 0's HTTP server (listening while the model loads), its stop on a signal, and a
server in a background thread for Python programs and tests.

A stop (SIGINT, SIGTERM, or `RunningServer.stop`) first shuts the engine down, so that the open
streams end at once, each with a finish_reason, and the other ranks return; uvicorn then closes
the connections, waiting at most `GRACE_S` for the last ones.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Optional

import uvicorn

from llama.generation import Llama
from llama.serve.app import ServeConfig, create_app
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


def uvicorn_config(app, log_level: str = "info") -> uvicorn.Config:
    # log_config=None: uvicorn's loggers go to the process's own logging setup (rank 0: INFO). Its access
    # log names the method, path and status of each request, never a body.
    return uvicorn.Config(app, log_config=None, log_level=log_level, timeout_graceful_shutdown=GRACE_S,
                          lifespan="on")


def serve_rank0(build: Callable[[], Llama], service: Service, config: ServeConfig, sock: socket.socket) -> None:
    """Answer on `sock` at once (503 while loading), load the model with `build` in a thread, serve until
    a signal. Raises what `build` raised; SystemExit(1) if the engine failed (e.g. a rank died)."""
    server = Server(uvicorn_config(create_app(service, config)), service)
    loaded = threading.Event()
    errors = []

    def load() -> None:
        try:
            g = build()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            server.exit()
            return
        if service.stopping:
            g.shutdown()
        else:
            service.start(g)
            if service.stopping:  # the stop came while it started, and found no model to shut down
                service.stop()
            else:
                host, port = sock.getsockname()[:2]
                log.info("ready: %s on http://%s:%d (the page at /, the OpenAI API at /v1)",
                         service.model_name, host, port)
        loaded.set()

    loading = threading.Thread(target=load, name="llama-load", daemon=True)
    loading.start()
    server.run(sockets=[sock])
    service.stop()
    if not loaded.is_set() and not errors:
        # An interpreter that exits under a thread still in torch's C++ aborts; and under model parallelism the
        # other ranks end only when the loaded model is shut down (load() does it).
        log.info("stopped while the model was loading: exiting once the load ends")
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


def serve_in_thread(g: Llama, host: str = "127.0.0.1", port: int = 0, config: Optional[ServeConfig] = None,
                    model_name: str = "llama", max_queue: int = 256, stream_interval: float = STREAM_INTERVAL_S,
                    timeout: float = 60.0) -> RunningServer:
    """Serve `g` (model-parallel size 1) from a background thread, once it answers. No signal handlers."""
    service = Service(model_name, g.max_seq_len, max_queue, stream_interval)
    server = Server(uvicorn_config(create_app(service, config or ServeConfig()), log_level="warning"), service)
    sock = bind(host, port)
    service.start(g)
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
