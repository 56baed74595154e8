"""The fields of an OpenAI completions or chat request, checked one by one.

Each check names the field (the error's `param`) and what it accepts, so a client learns what to fix
from the 400 alone. Fields OpenAI defines that change what the model computes and that this server
cannot honour (penalties, logit_bias, suffix, tools, ...) are refused rather than ignored; fields
that change nothing here (`user`, `service_tier`, ...) are ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from llama.serve.errors import invalid
from llama.text import check_stop

MAX_CHOICES = 16  # n per request: each choice is a request of its own in the engine
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Sampling:
    """The fields both endpoints share. max_tokens None: up to the end of max_seq_len (chat's default)."""

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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(body: dict, name: str, default: Optional[int], minimum: int,
            maximum: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < minimum or (maximum is not None and v > maximum):
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise invalid(f"{name}={v!r} must be an integer {bound}", name)
    return v


def number(body: dict, name: str, default: float) -> float:
    """A finite number, as sent (an int stays an int, so errors quote it as the client wrote it)."""
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise invalid(f"{name}={v!r} must be a number", name)
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(f"{name}={v!r} must be true or false", name)
    return v


def stop_strings(body: dict) -> List[str]:
    """`stop`: a string or a list of them, bounded in number and length (llama.text.check_stop)."""
    v = body.get("stop")
    try:
        return check_stop(v)
    except ValueError as e:
        raise invalid(str(e), "stop") from None


def refuse_unsupported(body: dict, fields: Dict[str, Any]) -> None:
    """400 for each field in `fields` that is present with a value other than its neutral one."""
    for name, neutral in fields.items():
        v = body.get(name)
        if v is not None and v != neutral and not (isinstance(neutral, (list, dict)) and not v):
            raise invalid(f"{name} is not supported by this server: leave it out", name)


def sampling(body: dict, *, chat: bool) -> Sampling:
    """The sampling fields, with OpenAI's defaults (temperature 1, top_p 1; completions: 16 tokens)."""
    temperature = number(body, "temperature", 1.0)
    if temperature < 0:
        raise invalid(f"temperature={temperature!r} must be >= 0 (0 is greedy)", "temperature")
    top_p = number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise invalid(f"top_p={top_p!r} must be in (0, 1]; 1 disables nucleus sampling", "top_p")
    if chat:
        max_tokens = integer(body, "max_completion_tokens", None, 0)
        max_tokens = integer(body, "max_tokens", max_tokens, 0)
        logprobs = boolean(body, "logprobs")
        integer(body, "top_logprobs", 0, 0, 20)
        echo = False
    else:
        max_tokens = integer(body, "max_tokens", 16, 0)
        logprobs = integer(body, "logprobs", None, 0, 5) is not None
        echo = boolean(body, "echo")
    n = integer(body, "n", 1, 1, MAX_CHOICES)
    best_of = integer(body, "best_of", n, 1)
    if best_of != n:
        raise invalid(f"best_of={best_of} is not supported: leave it out or make it equal n", "best_of")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                    top_k=integer(body, "top_k", 0, 0), seed=integer(body, "seed", None, -(2**63), 2**63 - 1),
                    stop=stop_strings(body), n=n,
                    stream=boolean(body, "stream"), include_usage=boolean(options or {}, "include_usage"),
                    logprobs=logprobs, echo=echo)


def prompts(body: dict) -> List[str]:
    """`prompt`: a string or a non-empty list of strings."""
    v = body.get("prompt")
    if v is None:
        raise invalid("prompt is missing: send a string or a list of strings", "prompt")
    texts = [v] if isinstance(v, str) else v
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid("prompt must be a string or a non-empty list of strings (token arrays are not accepted)",
                      "prompt")
    return texts


def messages(body: dict) -> List[Dict[str, str]]:
    """`messages` as a dialog: {role, content} with system (or developer), user and assistant roles;
    content a string or a list of text parts."""
    v = body.get("messages")
    if v is None:
        raise invalid("messages is missing: send a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(v, list) or not v:
        raise invalid("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    dialog = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise invalid(f"messages[{i}] must be an object whose role is system, user or assistant",
                          f"messages[{i}].role")
        dialog.append({"role": _ROLES[m["role"]], "content": _content(m.get("content"), i)})
    return dialog


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise invalid(f"messages[{i}].content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                  "parts (this model reads text only)", f"messages[{i}].content")
