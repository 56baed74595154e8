"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""
from __future__ import annotations

from typing import Dict, Optional

from starlette.responses import JSONResponse


class APIError(Exception):
    """A request the server answers with an error body instead of a completion."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 for a field the request got wrong; the message says what to send instead."""
    return APIError(400, message, param=param, code=code)


def failure_message(error: Optional[BaseException], engine_stopped: bool = False) -> str:
    """What a client reads of a generation that failed. A request's own error (a ValueError such as NaN
    logits) says what went wrong with it; anything else (a model-parallel rank that died, a bug) is
    internal, and only the server's log has the detail (llama.engine and llama.serve.service log it)."""
    if engine_stopped:
        return "generation failed: a model worker stopped, and the server is going down"
    if isinstance(error, ValueError):
        return f"generation failed: {type(error).__name__}: {error}"
    return "generation failed: an internal error stopped it (the server's log has the details)"
