"""The FastAPI app: the OpenAI routes, vLLM's adapter routes, /health, /metrics, and the Gradio page at `/`.

A request's `model` chooses among the models served (llama.serve.service): a model's name, an
adapter's (`NAME` or `BASE:NAME`), or none for the first model; any other is a 404 that names those
served. /v1/models lists every model (with `max_model_len`, and whether it is loaded) and adapter
(with its `parent`); /health says which models are loaded. `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` take vLLM's bodies ({"lora_name", "lora_path"}), behind the API key.

Guards, outermost first: CORS (only with `cors`), the request body limit (413 beyond
`max_body_bytes`, for every path), the page's login back-off, then per route the API key (401).
With an API key every /v1 route and /metrics need `Authorization: Bearer KEY`, and the page asks
for it at a login form (any user name, the key as password); /health stays open, for load
balancers. A client that keeps sending wrong keys or logins waits (429) before each further try
(llama.serve.limits.Throttle). Unknown /v1 paths and wrong methods get OpenAI's error shape (404, 405).
"""
from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, List, Optional

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match

from llama.serve import api
from llama.serve.errors import APIError
from llama.serve.limits import BodyLimit, BodyTooLarge, LoginThrottle, Throttle, too_many_failures
from llama.serve.service import Service

log = logging.getLogger(__name__)

_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass
class ServeConfig:
    api_key: Optional[str] = None
    cors: bool = False
    max_body_bytes: int = 1 << 20
    page: bool = True
    max_auth_failures: int = 5  # wrong keys or page logins in a row from one address before each try waits
    header_timeout_s: float = 10.0  # for a request's head to arrive (llama.serve.server.GuardedH11)
    body_timeout_s: float = 30.0  # for its body to arrive, after the head
    max_connections: int = 1000  # open at once; beyond, a new connection gets a 503


def check_api_key(api_key: Optional[str]) -> None:
    """Refuse a key HTTP cannot carry as it is: it must be visible ASCII (no spaces, no accents), since
    clients send it in a header (the `openai` client refuses anything else)."""
    if api_key is None:
        return
    if not api_key.strip():
        raise ValueError("api_key is empty: pass a non-empty key, or none to serve without one")
    bad = next((i for i, ch in enumerate(api_key) if not "!" <= ch <= "~"), None)
    if bad is not None:
        raise ValueError(f"api_key holds a character that is not visible ASCII (at position {bad}): a key must be "
                         "letters, digits and punctuation without spaces, which every HTTP client can send in a "
                         "header; choose another key")


def create_app(service: Service, config: ServeConfig) -> FastAPI:
    check_api_key(config.api_key)
    app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None)  # docs would load from a CDN
    app.state.on_shutdown = []  # called in the server's loop as it stops (llama.serve.server.Server)
    throttle = Throttle(free=config.max_auth_failures)
    guard = _Guard(config.api_key, throttle)
    open_guard = _Guard(None, throttle)  # /health is open, whatever the method

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD too: some load balancers probe with it
    async def health() -> Response:
        models = {name: {"state": st["state"], "load_s": st["load_s"]} for name, st in service.pool.status().items()}
        loaded = [name for name, st in models.items() if st["state"] == "loaded"]
        if service.ready:
            return JSONResponse({"status": "ok", "model": service.default, "loaded": loaded, "models": models})
        status = "failed" if service.failure is not None else "stopping" if service.stopping else "loading"
        return JSONResponse({"status": status, "loaded": loaded, "models": models}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        guard.check(request)
        body, content_type = service.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def every(body):
            return JSONResponse({"object": "list", "data": _model_cards(service)})
        return await _answer(service, request, guard, None, every)

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> Response:
        async def one(body):
            base, adapter = service.resolve(name)
            return JSONResponse(next(c for c in _model_cards(service) if c["id"] == (adapter or base)))
        return await _answer(service, request, guard, None, one)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        async def load(body):
            name = await service.load_adapter(body.get("lora_name"), body.get("lora_path"),
                                               body.get("base_model_name"), body.get("load_inplace") is True)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")
        return await _answer(service, request, guard, "body", load, check_model=False)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        async def unload(body):
            name = await service.unload_adapter(body.get("lora_name"))
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
        return await _answer(service, request, guard, "body", unload, check_model=False)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(service, request, guard, "body",
                             lambda body: api.completions(service, request, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(service, request, guard, "body",
                             lambda body: api.chat_completions(service, request, body))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await _answer(service, request, guard, "body", lambda body: api.tokenize(service, body))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await _answer(service, request, guard, "body", lambda body: api.detokenize(service, body))

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Response:
        async def info(body):
            return await api.tokenizer_info(service, request.query_params.get("model"))
        return await _answer(service, request, guard, None, info)

    async def unknown(request: Request) -> Response:
        """Paths under /v1 that no route serves, and methods a route does not take: OpenAI's 404 and 405."""
        async def refuse(body):
            allowed = sorted({m for r in app.router.routes if r is not request.scope.get("route")
                              and r.matches(request.scope)[0] is Match.PARTIAL for m in getattr(r, "methods", ())})
            target = f"{request.method} {request.url.path[:100]}"
            if allowed:
                raise APIError(405, f"{target} is not allowed: use {' or '.join(allowed)}", code="method_not_allowed",
                               headers={"Allow": ", ".join(allowed)})
            raise APIError(404, f"Invalid URL ({target}): this server serves /v1/models, /v1/completions, "
                           "/v1/chat/completions, /v1/load_lora_adapter and /v1/unload_lora_adapter",
                           code="not_found")
        return await _answer(service, request, open_guard if request.url.path == "/health" else guard, None, refuse)

    for path in ("/v1/{path:path}", "/health", "/metrics"):  # after the routes: only what they do not take
        app.add_api_route(path, unknown, methods=_METHODS, include_in_schema=False)
    if config.page:
        from llama.serve.page import mount_page  # gradio is a heavy import: only when the page is wanted

        app.state.on_shutdown.append(mount_page(app, service, api_key=config.api_key))
        if config.api_key:
            app.add_middleware(LoginThrottle, throttle=throttle)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.cors:
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    return app


class _Guard:
    """The API key check, in constant time; a client that sent `throttle.free` wrong keys in a row waits."""

    def __init__(self, api_key: Optional[str], throttle: Throttle):
        self._key = None if not api_key else f"Bearer {api_key}".encode()
        self._throttle = throttle

    def check(self, request: Request) -> None:
        if self._key is None:
            return
        client = request.client.host if request.client else ""
        wait = self._throttle.wait_s(client)
        if wait > 0:
            raise too_many_failures(wait)
        given = request.headers.get("authorization")
        if given is None or not hmac.compare_digest(given.encode("latin-1"), self._key):
            if given is not None:  # a guess; a request without any key tells nobody anything
                self._throttle.failed(client)
            raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        self._throttle.succeeded(client)


async def _answer(service: Service, request: Request, guard: _Guard, body: Optional[str],
                  handle: Callable[[Optional[dict]], Awaitable[Response]], check_model: bool = True) -> Response:
    """Check the key, read the JSON body (with `body`) and its model's name, run `handle`; count the answer by
    status."""
    try:
        guard.check(request)
        data = await _json(request) if body else None
        if check_model and data is not None and data.get("model") is not None:
            service.resolve(data["model"])  # a 404 before any 400 about the rest of the body
        response = await handle(data)
    except APIError as e:
        response = e.response()
    except ClientDisconnect:  # the client left while sending its body: nobody reads an answer
        response = Response(status_code=api.CLIENT_GONE)
    except Exception as e:  # noqa: BLE001 - a bug: still an OpenAI-shaped answer, and the server goes on
        log.exception("%s %s failed", request.method, request.url.path)
        response = APIError(500, f"internal error: {type(e).__name__}", code="internal_error").response()
    # The route's template (/v1/models/{name}), not the path a client made up: the series stay few.
    service.metrics.response(getattr(request.scope.get("route"), "path_format", request.url.path), response.status_code)
    return response


async def _json(request: Request) -> dict:
    try:
        raw = await request.body()
    except BodyTooLarge as e:
        raise APIError(413, str(e), code="body_too_large") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}): send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def _model_cards(service: Service) -> List[dict]:
    """OpenAI's model objects, with each model's context length as vLLM reports it (`max_model_len`) and
    whether it is loaded now; each adapter's names its base as `parent`, as vLLM's do."""
    status = service.pool.status()
    cards = [{"id": name, "object": "model", "created": service.created, "owned_by": "llama", "root": name,
              "parent": None, "max_model_len": service.max_seq_len(name), "loaded": status[name]["state"] == "loaded"}
             for name in service.pool.names]
    for adapter, (base, _) in sorted(service.adapters().items()):
        cards.append({"id": adapter, "object": "model", "created": service.created, "owned_by": "llama",
                      "root": base, "parent": base, "max_model_len": service.max_seq_len(base),
                      "loaded": status[base]["state"] == "loaded"})
    return cards
