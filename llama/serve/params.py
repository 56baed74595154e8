"""The bodies of OpenAI's completions and chat completions requests, as pydantic models.

Each field is declared once: its type, range and default. A body that does not validate is OpenAI's 400,
whose `param` is the path of the first field at fault (`temperature`, `messages[0].role`) and whose message
says what the field got and what it takes. A request's sampling settings become the library's one
`SamplingParams` (llama.sampling), which checks them as it does for the Python API. Fields other servers take
that would change the output and that this one cannot honour (`suffix`, `typical_p`, `ignore_eos`, ...: see
REFUSED) are refused by name rather than ignored; fields that change nothing here (`user`,
`service_tier`, ...) are ignored. A new field is one line in `_Request` (both endpoints) or in one of the
two models, and one where `sampling()` builds the SamplingParams.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Type, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llama.chat_format import tool_call_schema
from llama.sampling import Constraint, SamplingParams
from llama.serve.errors import APIError, invalid
from llama.text import check_stop

MAX_CHOICES = 16  # n per request: each choice is a request of its own in the engine

StrictInt = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # a JSON number (not a bool, not a string)
Switch = Annotated[bool, Field(strict=True)]
Seed = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
Text = Annotated[str, Field(strict=True)]


@dataclass
class Tools:
    """A chat request's tools (OpenAI's definitions) and how the answer may use them: "auto" (a tool call or
    text), "required" (a call of any of them), or a function's name (a call of it). Llama 3.1 makes one call
    per answer (Meta's format has no parallel calls): a required or named call is exactly one, whatever
    parallel_tool_calls says; "auto" also reads several calls joined by "; " if a model writes them."""

    definitions: List[dict]
    choice: str

    def constraint(self) -> Optional[Constraint]:
        """What a required or named call's text must match: the call's JSON."""
        if self.choice == "auto":
            return None
        schema = tool_call_schema(self.definitions, None if self.choice == "required" else self.choice)
        return Constraint("json_schema", json.dumps(schema))

    @property
    def names(self) -> List[str]:
        return [t["function"]["name"] for t in self.definitions]


@dataclass
class Sampling:
    """What the engine needs of a request, from either endpoint (or the page): the library's SamplingParams
    (max_tokens None: up to the end of max_seq_len, chat's default), and how the answer is sent."""

    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    tools: Optional[Tools] = None

    @property
    def max_tokens(self) -> Optional[int]:
        return self.params.max_tokens

    @property
    def seed(self) -> Optional[int]:
        return self.params.seed

    @property
    def logprobs(self) -> bool:
        return self.params.logprobs


# Fields other OpenAI-style servers (vLLM, llama.cpp, TGI, text-generation-webui) take that would change the
# output, and that this server does not honour: refused by name, never ignored.
REFUSED = ("typical_p", "use_beam_search", "length_penalty", "early_stopping", "ignore_eos", "min_tokens",
           "bad_words", "allowed_token_ids", "prompt_logprobs", "truncate_prompt_tokens", "guided_choice",
           "guided_decoding_backend", "guided_whitespace_pattern", "include_stop_str_in_output",
           "skip_special_tokens", "spaces_between_special_tokens", "mirostat", "mirostat_tau", "mirostat_eta",
           "tfs_z", "top_a", "dynatemp_range", "dynatemp_exponent", "xtc_probability", "xtc_threshold",
           "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "repeat_penalty",
           "repeat_last_n", "penalize_nl", "n_probs", "grammar", "json_schema", "samplers", "smoothing_factor",
           "epsilon_cutoff", "eta_cutoff", "do_sample", "watermark", "decoder_input_details")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: Switch = False


def _unsupported(value: Any, neutral: Any) -> Any:
    """A field this server cannot honour: refused unless absent or at its neutral value."""
    if value is not None and value != neutral and not (isinstance(neutral, (list, dict)) and not value):
        raise ValueError("is not supported by this server: leave it out")
    return value


class ResponseFormat(_Body):
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": true}}."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[Dict[str, Any]] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and not (isinstance(self.json_schema, dict)
                                               and isinstance(self.json_schema.get("schema"), dict)):
            raise _FieldError(("response_format", "json_schema"),
                              'a json_schema response_format needs "json_schema": {"name": ..., "schema": {...}}')
        return self

    def constraint(self) -> Optional[Constraint]:
        if self.type == "json_object":
            return Constraint("json_object")
        if self.type == "json_schema":
            return Constraint("json_schema", json.dumps(self.json_schema["schema"]))
        return None


class _Request(_Body):
    """The fields both endpoints share, with OpenAI's defaults (temperature 1, top_p 1, n 1)."""

    model: Optional[Any] = None  # checked against the served name before validation (a 404, not a 400)
    temperature: Number = Field(1.0, ge=0, description="0 is greedy")
    top_p: Number = Field(1.0, gt=0, le=1, description="1 disables nucleus sampling")
    top_k: StrictInt = Field(0, ge=0, description="an extension: keep the k most likely tokens; 0 keeps all")
    min_p: Number = Field(0.0, ge=0, le=1, description="an extension: drop tokens below min_p x the top one's")
    repetition_penalty: Number = Field(1.0, gt=0, description="an extension: CTRL's, over prompt and output")
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[Dict[str, Number]] = Field(None, max_length=300)
    seed: Optional[Seed] = None
    stop: Optional[List[Annotated[Text, Field(min_length=1)]]] = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    best_of: Optional[StrictInt] = Field(None, ge=1)
    stream: Switch = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, body: Any) -> Any:
        if isinstance(body, dict):
            named = next((k for k in REFUSED if body.get(k) is not None), None)
            if named is not None:
                raise _at(named, f"{named} is not supported by this server: leave it out (it would change the "
                                 "output, so it is refused rather than ignored)")
        return body

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        return None if v is None else check_stop(v)  # bounded in number and length (llama.text)

    @model_validator(mode="after")
    def _best_of_is_n(self) -> "_Request":
        if self.best_of is not None and self.best_of != self.n:
            raise _at("best_of", f"best_of={self.best_of} is not supported: leave it out or make it equal n")
        return self

    def _sampling(self, max_tokens: Optional[int], logprobs: bool, top_logprobs: int, echo: bool = False,
                  constraint: Optional[Constraint] = None, tools: Optional[Tools] = None) -> Sampling:
        if constraint is None and self.response_format is not None:
            constraint = self.response_format.constraint()
        try:
            params = SamplingParams(
                temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k,
                min_p=float(self.min_p), max_tokens=max_tokens, stop=tuple(self.stop or ()), seed=self.seed,
                logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=logprobs and echo,
                presence_penalty=float(self.presence_penalty), frequency_penalty=float(self.frequency_penalty),
                repetition_penalty=float(self.repetition_penalty), logit_bias=self.logit_bias or (),
                constraint=constraint)
        except ValueError as e:
            raise invalid(str(e), _field_of(str(e))) from None
        return Sampling(params, n=self.n, stream=self.stream,
                        include_usage=bool(self.stream_options and self.stream_options.include_usage), echo=echo,
                        tools=tools)


def _field_of(message: str) -> str:
    """The request field a SamplingParams error names ("logit_bias[5]=101 must ..." is logit_bias's)."""
    head = message.split("=", 1)[0].split("[", 1)[0].split(" ", 1)[0]
    return {"stop_token_ids": "stop", "constraint": "response_format"}.get(head, head)


TokenIds = List[Annotated[int, Field(strict=True, ge=0)]]


class CompletionRequest(_Request):
    """`POST /v1/completions`. A prompt may be text, a list of texts, token ids (a list of ints) or a list of
    token-id lists (as OpenAI's spec allows and lm-evaluation-harness sends): token ids are used exactly as
    given, no BOS added."""

    prompt: Union[List[Text], List[TokenIds]] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(16, ge=0)
    echo: Switch = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    suffix: Optional[Any] = None
    guided_json: Optional[Any] = None
    guided_regex: Optional[Text] = None
    guided_grammar: Optional[Text] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return [v]  # one prompt of token ids
        if isinstance(v, list) and any(isinstance(t, list) and not t for t in v):
            raise ValueError("holds an empty list of token ids: each prompt needs at least one token")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        return _unsupported(v, "")

    @property
    def token_prompts(self) -> bool:
        return isinstance(self.prompt[0], list)

    def sampling(self) -> Sampling:
        guided = [(k, v) for k, v in (("json_schema", self.guided_json), ("regex", self.guided_regex),
                                      ("grammar", self.guided_grammar)) if v is not None]
        if len(guided) + (self.response_format is not None and self.response_format.type != "text") > 1:
            raise APIError(400, "ask for one output constraint: response_format, guided_json, guided_regex or "
                           "guided_grammar", param="response_format")
        constraint = None
        if guided:
            kind, spec = guided[0]
            if kind == "json_schema":
                spec = spec if isinstance(spec, str) else json.dumps(spec)
            if kind == "grammar":  # Lark, or llama.cpp's GBNF (its rules are written with ::=)
                kind = "gbnf" if "::=" in spec else "lark"
            try:
                constraint = Constraint(kind, spec)
            except ValueError as e:
                raise invalid(str(e), f"guided_{guided[0][0].split('_')[0]}") from None
        n_top = self.logprobs or 0
        return self._sampling(16 if self.max_tokens is None else self.max_tokens, self.logprobs is not None, n_top,
                              self.echo, constraint)


class FunctionCall(_Body):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: Optional[Text] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    """A chat message: system (or developer), user, assistant or tool; content a string or a list of text parts
    (an assistant's may be null when it calls tools)."""

    role: str
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[Text] = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> str:
        roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
        if not isinstance(v, str) or v not in roles:
            raise ValueError("must be system, user, assistant or tool (or developer, read as system)")
        return roles[v]

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Optional[str]:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts (this model reads text '
                         "only)")

    @model_validator(mode="after")
    def _has_content(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _FieldError(("content",), "content is missing: only an assistant message that calls tools may "
                                            "leave it out")
        return self


class Function(_Body):
    name: Annotated[str, Field(strict=True, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Optional[Text] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


class NamedChoice(_Body):
    type: Literal["function"]
    function: Dict[Literal["name"], Text]


class ChatRequest(_Request):
    """`POST /v1/chat/completions`. Without max_tokens (or max_completion_tokens) an answer may run to the end of
    the context, as OpenAI's does."""

    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    logprobs: Switch = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    tools: Optional[List[Tool]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedChoice]] = None
    parallel_tool_calls: Switch = True
    functions: Optional[Any] = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: Any) -> Any:
        if v:
            raise ValueError("is OpenAI's deprecated form: send tools instead")
        return v

    @model_validator(mode="after")
    def _choice_names_a_tool(self) -> "ChatRequest":
        if isinstance(self.tool_choice, NamedChoice):
            name = self.tool_choice.function.get("name")
            if name not in [t.function.name for t in self.tools or []]:
                raise _at("tool_choice", f"tool_choice names the function {name!r}, which tools does not define")
        elif self.tool_choice in ("auto", "required") and not self.tools:
            raise _at("tool_choice", f"tool_choice={self.tool_choice!r} needs tools")
        if self.tools and self.response_format is not None and self.response_format.type != "text":
            raise _at("response_format", "response_format and tools cannot be used together")
        return self

    def dialog(self) -> List[Dict[str, Any]]:
        out = []
        for m in self.messages:
            message: Dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out

    def tool_use(self) -> Optional[Tools]:
        """The tools the answer may call, or None (no tools, or tool_choice "none": the model answers in text)."""
        if not self.tools or self.tool_choice == "none":
            return None
        choice = self.tool_choice or "auto"
        definitions = [t.model_dump(exclude_none=True) for t in self.tools]
        name = choice.function["name"] if isinstance(choice, NamedChoice) else choice
        return Tools(definitions, name)

    def sampling(self) -> Sampling:
        max_tokens = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        tools = self.tool_use()
        constraint = None if tools is None else tools.constraint()
        return self._sampling(max_tokens, self.logprobs, self.top_logprobs or 0 if self.logprobs else 0,
                              constraint=constraint, tools=tools)


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
        if isinstance(part, str) and ("[" in part or "(" in part):  # a union's member ("list[str]"), not a field
            continue
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
