"""The bodies of OpenAI's completions and chat completions requests, as pydantic models.

Each field is declared once: its type, range and default. A body that does not validate is OpenAI's 400,
whose `param` is the path of the first field at fault (`temperature`, `messages[0].role`) and whose message
says what the field got and what it takes. Fields OpenAI defines that would change the output and that this
server cannot honour (penalties, logit_bias, suffix, tools, ...) are refused rather than ignored; fields that
change nothing here (`user`, `service_tier`, ...) are ignored. A new field is one line in `_Request` (both
endpoints) or in one of the two models, and one in `Sampling` when the engine needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Optional, Tuple, Type, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama.serve.errors import APIError, invalid
from llama.text import check_stop

MAX_CHOICES = 16  # n per request: each choice is a request of its own in the engine

StrictInt = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # a JSON number (not a bool, not a string)
Switch = Annotated[bool, Field(strict=True)]
Seed = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
Text = Annotated[str, Field(strict=True)]


@dataclass
class Sampling:
    """What the engine needs of a request, from either endpoint (or the page). max_tokens None: up to the end of
    max_seq_len (chat's default)."""

    max_tokens: Optional[int]
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    stop: List[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: Switch = False


def _unsupported(value: Any, neutral: Any) -> Any:
    """A field this server cannot honour: refused unless absent or at its neutral value."""
    if value is not None and value != neutral and not (isinstance(neutral, (list, dict)) and not value):
        raise ValueError("is not supported by this server: leave it out")
    return value


class _Request(_Body):
    """The fields both endpoints share, with OpenAI's defaults (temperature 1, top_p 1, n 1)."""

    model: Optional[Any] = None  # checked against the served name before validation (a 404, not a 400)
    temperature: Number = Field(1.0, ge=0, description="0 is greedy")
    top_p: Number = Field(1.0, gt=0, le=1, description="1 disables nucleus sampling")
    top_k: StrictInt = Field(0, ge=0, description="an extension: keep the k most likely tokens; 0 keeps all")
    seed: Optional[Seed] = None
    stop: Optional[List[Annotated[Text, Field(min_length=1)]]] = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    best_of: Optional[StrictInt] = Field(None, ge=1)
    stream: Switch = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[Any] = None
    frequency_penalty: Optional[Any] = None
    logit_bias: Optional[Any] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        return None if v is None else check_stop(v)  # bounded in number and length (llama.text)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalties(cls, v: Any) -> Any:
        return _unsupported(v, 0)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: Any) -> Any:
        return _unsupported(v, {})

    @model_validator(mode="after")
    def _best_of_is_n(self) -> "_Request":
        if self.best_of is not None and self.best_of != self.n:
            raise _at("best_of", f"best_of={self.best_of} is not supported: leave it out or make it equal n")
        return self

    def _sampling(self, max_tokens: Optional[int], logprobs: bool, echo: bool = False) -> Sampling:
        return Sampling(max_tokens=max_tokens, temperature=float(self.temperature), top_p=float(self.top_p),
                        top_k=self.top_k, seed=self.seed, stop=list(self.stop or []), n=self.n, stream=self.stream,
                        include_usage=bool(self.stream_options and self.stream_options.include_usage),
                        logprobs=logprobs, echo=echo)


class CompletionRequest(_Request):
    """`POST /v1/completions`."""

    prompt: List[Text] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(16, ge=0)
    echo: Switch = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)
    suffix: Optional[Any] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and all(isinstance(t, int) or isinstance(t, list) for t in v):
            raise ValueError("must be a string or a non-empty list of strings (token arrays are not accepted)")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        return _unsupported(v, "")

    def sampling(self) -> Sampling:
        return self._sampling(16 if self.max_tokens is None else self.max_tokens, self.logprobs is not None,
                              self.echo)


class Message(_Body):
    """A chat message: system (or developer), user or assistant; content a string or a list of text parts."""

    role: str
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> str:
        roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
        if not isinstance(v, str) or v not in roles:
            raise ValueError("must be system, user or assistant (or developer, read as system)")
        return roles[v]

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts (this model reads text '
                         "only)")


class ChatRequest(_Request):
    """`POST /v1/chat/completions`. Without max_tokens (or max_completion_tokens) an answer may run to the end of
    the context, as OpenAI's does."""

    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: Switch = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    response_format: Optional[Any] = None
    tools: Optional[Any] = None
    functions: Optional[Any] = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is not None and v != {"type": "text"}:
            raise ValueError('only {"type": "text"} is supported')
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        return _unsupported(v, [])

    def dialog(self) -> List[Dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def sampling(self) -> Sampling:
        max_tokens = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return self._sampling(max_tokens, self.logprobs)


R = TypeVar("R", bound=_Request)


def parse(model: Type[R], body: dict) -> R:
    """`body` as `model`, or the 400 that names the first field at fault."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _api_error(e.errors()[0], body) from None


class _FieldError(ValueError):
    """A check across fields, reported at one of them."""

    def __init__(self, loc: Tuple[Union[str, int], ...], message: str):
        super().__init__(message)
        self.loc = loc


def _at(field: str, message: str) -> _FieldError:
    return _FieldError((field,), message)


def param_of(loc: Tuple[Union[str, int], ...]) -> Optional[str]:
    """A pydantic error location as OpenAI's `param`: ("messages", 0, "role") is "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _api_error(error: dict, body: dict) -> APIError:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        return invalid(str(cause), param_of(cause.loc))
    param = param_of(tuple(error["loc"]))
    if error["type"] == "missing":
        return invalid(f"{param} is missing", param)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and message.startswith(str(param)):  # it names the field and value itself
        return invalid(message, param)
    if error["type"] != "value_error":  # pydantic's words for a type or a range: "Input should be ..."
        message = message[:1].lower() + message[1:]
    value = error.get("input")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return invalid(f"{param}={shown}: {message}", param)
