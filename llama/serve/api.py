"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's request and response shapes.

A request becomes one engine request per prompt and choice (`Service.watch`); the answer is built
from their completions, whole or as server-sent events (`data: {json}` chunks, then
`data: [DONE]`). Streamed and whole answers read the same text, so they agree exactly.

Where OpenAI leaves room, this server chooses: a request cut short by a server shutdown ends with
finish_reason "length" (the answer is incomplete; OpenAI has no other value for that); log-probabilities
are the model's own, before penalties, bias, constraints and temperature; a failure in the engine is a
500, or in a stream an `error` event.

Tool calls (chat, Llama 3 tokenizers): the tools go into the prompt in Llama 3.1's format
(llama.chat_format); an answer that is wholly tool calls comes back as `tool_calls`, finish_reason
"tool_calls". With tool_choice "required" or a named function the answer is constrained to such calls.
Streamed, an answer that may be a call is held back until it is known: once its first character is
not the start of a call it streams as text; a call comes in one chunk, whole, when the answer ends.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Dict, List, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llama.chat_format import PYTHON_TAG, parse_tool_calls
from llama.generation import Completion, Delta, Llama
from llama.serve import params
from llama.serve.errors import APIError, failure_message, invalid
from llama.serve.params import Sampling, Tools
from llama.serve.service import Service
from llama.serve.watch import Change, Watch

CLIENT_GONE = 499  # the status counted for a whole answer whose client left first (nobody reads it)
_DISCONNECT_POLL_S = 0.5  # how often a whole (not streamed) answer checks that its client is still there


async def completions(service: Service, request: Request, body: dict) -> Response:
    req = params.parse(params.CompletionRequest, body)
    sampling = req.sampling()
    with await service.admit(req.model) as m:
        generator = m.llama
        if req.token_prompts:  # token ids, exactly as given
            prompts = [list(p) for p in req.prompt]
            vocab = generator.model.vocab_size
            bad = next((t for p in prompts for t in p if t >= vocab), None)
            if bad is not None:
                raise invalid(f"prompt holds token id {bad}: this model's ids are 0 to {vocab - 1}", "prompt")
            texts = [generator.tokenizer.decode(p) for p in prompts]
        else:
            texts = list(req.prompt)
            try:
                prompts = [generator.tokenizer.encode(t, bos=True, eos=False) for t in texts]
            except ValueError as e:  # e.g. a lone surrogate
                raise invalid(f"prompt: {e}", "prompt") from None
        max_new = [_max_new(generator, len(p), sampling.max_tokens, "prompt") for p in prompts]
        watch = service.watch(m, prompts, sampling, max_new)
    answer = _Answer(generator, m.model, "cmpl", "text_completion", sampling, prompts, texts)
    if sampling.stream:
        return _sse(answer.stream(watch))
    if not await _wait(watch, request):
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(answer.whole(watch))


async def chat_completions(service: Service, request: Request, body: dict) -> Response:
    req = params.parse(params.ChatRequest, body)
    sampling, dialog = req.sampling(), req.dialog()
    with await service.admit(req.model) as m:
        generator = m.llama
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" \
            else None
        try:
            prompt = generator.encode_dialog(dialog, tools=tools)
        except ValueError as e:  # reserved chat tags, roles out of order, tools in a format without them
            raise invalid(f"messages: {e}", "tools" if "tool" in str(e) and tools else "messages") from None
        max_new = [_max_new(generator, len(prompt), sampling.max_tokens, "messages")]
        watch = service.watch(m, [prompt], sampling, max_new, decode_after=[])
    answer = _Answer(generator, m.model, "chatcmpl", "chat.completion", sampling, [prompt], None)
    if sampling.stream:
        return _sse(answer.stream(watch))
    if not await _wait(watch, request):
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(answer.whole(watch))


async def tokenize(service: Service, body: dict) -> Response:
    """`POST /tokenize` (vLLM's shape): {"prompt": text, "add_special_tokens": true} or {"messages": [...]} ->
    {"count", "max_model_len", "tokens"}; `model` chooses the tokenizer."""
    with await service.admit(body.get("model")) as m:
        generator = m.llama
    if "messages" in body:
        req = params.parse(params.ChatRequest, {"messages": body["messages"], "tools": body.get("tools")})
        try:
            tokens = generator.encode_dialog(req.dialog(), tools=[t.model_dump(exclude_none=True) for t in req.tools]
                                     if req.tools else None)
        except ValueError as e:
            raise invalid(f"messages: {e}", "messages") from None
    else:
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str) or not isinstance(special, bool):
            raise invalid('the body must be {"prompt": text, "add_special_tokens": true|false} or {"messages": '
                          "[...]}", "prompt")
        try:
            tokens = generator.tokenizer.encode(prompt, bos=special, eos=False)
        except ValueError as e:
            raise invalid(f"prompt: {e}", "prompt") from None
    return JSONResponse({"count": len(tokens), "max_model_len": generator.max_seq_len, "tokens": tokens})


async def detokenize(service: Service, body: dict) -> Response:
    """`POST /detokenize` (vLLM's shape): {"tokens": [ids]} -> {"prompt": text}; `model` chooses the tokenizer."""
    with await service.admit(body.get("model")) as m:
        generator = m.llama
    tokens, vocab = body.get("tokens"), generator.model.vocab_size
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                             for t in tokens)):
        raise invalid(f"tokens must be a list of token ids from 0 to {vocab - 1}", "tokens")
    return JSONResponse({"prompt": generator.tokenizer.decode(tokens)})


async def tokenizer_info(service: Service, model: Optional[str] = None) -> Response:
    """`GET /tokenizer_info` (vLLM's; `?model=NAME` chooses the model): what a client needs to tokenize as the
    server does (lm-evaluation-harness reads it, then uses /tokenize and /detokenize)."""
    from llama.chat_templates import CHAT_TEMPLATES

    with await service.admit(model) as m:
        generator = m.llama
    tok = generator.tokenizer
    token = lambda i: None if i is None or i < 0 else tok.token_bytes(i).decode("utf-8", "replace")  # noqa: E731
    return JSONResponse({"tokenizer_class": type(tok).__name__, "bos_token": token(tok.bos_id),
                         "eos_token": token(tok.eos_id), "pad_token": token(tok.pad_id),
                         "chat_template": CHAT_TEMPLATES.get(generator.chat_format),
                         "model_max_length": generator.max_seq_len,
                         "vocab_size": generator.model.vocab_size})


def _max_new(generator: Llama, prompt_len: int, max_tokens: Optional[int], what: str) -> int:
    """max_tokens, or all the room left; 400 when the prompt and max_tokens overflow max_seq_len."""
    limit = generator.max_seq_len
    if prompt_len >= limit:
        raise invalid(f"the {what} is {prompt_len} tokens long: this model's context is max_seq_len={limit} tokens "
                      "(the server's --max_seq_len), with room for at least one new token; shorten it", what,
                      code="context_length_exceeded")
    if max_tokens is None:
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise invalid(f"the {what} is {prompt_len} tokens long and max_tokens={max_tokens}: together more than this "
                      f"model's context of max_seq_len={limit} tokens (the server's --max_seq_len); ask for at most "
                      f"{limit - prompt_len} tokens or shorten the {what}", "max_tokens",
                      code="context_length_exceeded")
    return max_tokens


async def _wait(watch: Watch, request: Request) -> bool:
    """Until the watch's completions are done (True), or the client went away (False: they are cancelled)."""
    task = asyncio.ensure_future(watch.wait())
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=_DISCONNECT_POLL_S)
            if done:
                task.result()
                return True
            if await request.is_disconnected():
                return False
    finally:
        task.cancel()
        watch.cancel()


def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def finish_reason(reason: str) -> str:
    """The engine's reason in OpenAI's words: "stop", or "length" for any answer cut short."""
    return "stop" if reason == "stop" else "length"


def _tool_calls(calls: List[tuple]) -> List[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}
            for name, args in calls]


def _calls_in(text: str, tools: Optional[Tools]) -> Optional[List[tuple]]:
    return None if tools is None else parse_tool_calls(text, tools.names)


def _engine_error(watch: Watch, index: int) -> APIError:
    """The 500 of a completion that failed, or that the engine left open when it died."""
    return APIError(500, failure_message(watch.error(index), watch.failure is not None), code="engine_error")


class _Answer:
    """The response of one request: its id, its choices' text and log-probabilities, its usage."""

    def __init__(self, generator: Llama, model: str, prefix: str, kind: str, sampling: Sampling,
                 prompts: List[List[int]], texts: Optional[List[str]]):
        self.generator, self.model, self.kind, self.sampling = generator, model, kind, sampling
        self.chat = texts is None
        self.prompts, self.texts = prompts, texts
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _prompt_of(self, index: int) -> int:
        return index // self.sampling.n

    def usage(self, completions: List[Completion]) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens) for c in completions)
        # prompt tokens counted once per prompt, as are those its first choice found in the prefix cache
        cached = sum(c.cached_tokens for c in completions[:: self.sampling.n])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # Whole answers.

    def whole(self, watch: Watch) -> dict:
        completions = watch.completions
        failed = next((i for i, c in enumerate(completions) if c.finish_reason in ("error", None)), None)
        if failed is not None:
            raise _engine_error(watch, failed)
        choices = []
        for index, c in enumerate(completions):
            choice: Dict[str, object] = {"index": index}
            reason = finish_reason(c.finish_reason)
            if self.chat:
                calls = _calls_in(c.text, self.sampling.tools)
                choice["message"] = {"role": "assistant", "content": c.text} if calls is None else {
                    "role": "assistant", "content": None, "tool_calls": _tool_calls(calls)}
                reason = reason if calls is None else "tool_calls"
            else:
                echo = self.texts[self._prompt_of(index)] if self.sampling.echo else ""
                choice["text"] = echo + c.text
            choice["logprobs"] = self._logprobs(c, c.prompt_tokens[-1:], c.tokens, c.logprobs, self.sampling.echo,
                                                tops=c.request.token_top_logprobs)
            choice["finish_reason"] = reason
            choices.append(choice)
        return {**self._head(self.kind), "choices": choices, "usage": self.usage(completions)}

    def _logprobs(self, c: Completion, context: List[int], tokens: List[int], logprobs: List[Optional[float]],
                  echo: bool, offset: int = 0, tops: Optional[list] = None) -> Optional[dict]:
        """The logprobs object of `tokens` (read after `context`) with each one's alternatives `tops`, with the
        prompt's first if `echo`."""
        if not self.sampling.logprobs:
            return None
        tops = list(tops or [None] * len(tokens))
        if echo:
            r = c.request
            prompt_tops = [None] + r.prompt_top_logprobs if r.prompt_top_logprobs else [None] * len(c.prompt_tokens)
            context, tokens = [], c.prompt_tokens + tokens
            logprobs, tops = [None] + c.prompt_logprobs + logprobs, prompt_tops + tops
        if self.chat:
            return {"content": [{**self._alternative(t, lp), "top_logprobs": [self._alternative(a, p) for a, p in
                                                                              alts or []]}
                                for t, lp, alts in zip(tokens, logprobs, tops)]}
        strings = self._token_strings(context, tokens)
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        top = None if not self.sampling.params.top_logprobs else [
            None if alts is None else {self._text(a): p for a, p in alts} for alts in tops]
        return {"tokens": strings, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}

    def _bytes(self, token: int) -> bytes:
        return self.generator.tokenizer.token_bytes(token)

    def _text(self, token: int) -> str:
        """A token's text; bytes that are not whole UTF-8 characters as OpenAI writes them ("bytes:\\xe4")."""
        data = self._bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def _alternative(self, token: int, logprob: float) -> dict:
        return {"token": self._text(token), "logprob": logprob, "bytes": list(self._bytes(token))}

    def _token_strings(self, context: List[int], tokens: List[int]) -> List[str]:
        """Each token's text as it reads after the one before it (so SentencePiece's spaces stay)."""
        out = []
        for t in tokens:
            out.append(self.generator.decode_continuation(context, [t]))
            context = [t]
        return out

    # Streamed answers.

    async def stream(self, watch: Watch) -> AsyncIterator[bytes]:
        """The chunks of every choice as they come, then usage (if asked for) and [DONE]. Closing the
        stream (the client went away) cancels what still runs."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        usage = {"usage": None} if self.sampling.include_usage else {}
        states = [_ChoiceState(c.prompt_tokens[-1:]) for c in watch.completions]
        try:
            if self.chat:  # the role first, as OpenAI does, before any token
                yield _event({**self._head(kind), "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(len(watch.completions))], **usage})
            async for change in watch.changes():
                c = watch.completions[change.index]
                if change.finish_reason == "error":
                    yield _event(_engine_error(watch, change.index).body())
                    return
                choice = self._chunk_choice(c, change, states[change.index])
                if choice is not None:
                    yield _event({**self._head(kind), "choices": [choice], **usage})
            if self.sampling.include_usage:
                yield _event({**self._head(kind), "choices": [], "usage": self.usage(watch.completions)})
            yield b"data: [DONE]\n\n"
        finally:
            watch.cancel()

    def _chunk_choice(self, c: Completion, change: Change, state: "_ChoiceState") -> Optional[dict]:
        """One choice of a chunk, or None when the change adds nothing a client would see."""
        echo = self.sampling.echo and not state.started
        state.started = True
        delta = change.delta or Delta("", [], [])
        text = (self.texts[self._prompt_of(change.index)] if echo else "") + delta.text
        logprobs = None
        if self.sampling.logprobs and (delta.tokens or echo):
            logprobs = self._logprobs(c, state.context, delta.tokens, delta.logprobs, echo, state.offset,
                                      tops=delta.top_logprobs)
            if delta.tokens:
                state.context = delta.tokens[-1:]
            if not self.chat:
                state.offset += sum(len(s) for s in logprobs["tokens"])
        reason = None if change.finish_reason is None else finish_reason(change.finish_reason)
        if self.chat and self.sampling.tools is not None:
            return self._tool_chunk(change.index, state, text, logprobs, reason)
        if not text and logprobs is None and reason is None:
            return None
        body = {"delta": {"content": text} if text or reason is None else {}} if self.chat else {"text": text}
        return {"index": change.index, **body, "logprobs": logprobs, "finish_reason": reason}

    def _tool_chunk(self, index: int, state: "_ChoiceState", text: str, logprobs: Optional[dict],
                    reason: Optional[str]) -> Optional[dict]:
        """A chat chunk where the answer may be tool calls: held back while it may be one; then streamed as
        text, or sent whole as tool_calls when the answer ends."""
        state.held += text
        if logprobs is not None:
            state.held_logprobs += logprobs["content"]
        if state.mode is None:  # undecided: a call starts with "{" (or Llama's <|python_tag|>)
            head = state.held.lstrip()
            if self.sampling.tools.choice != "auto" or head.startswith(PYTHON_TAG) or head.startswith("{"):
                state.mode = "call" if head or self.sampling.tools.choice != "auto" else None
            elif head:
                state.mode = "text"
        if state.mode == "call" and reason is not None:
            calls = parse_tool_calls(state.held, self.sampling.tools.names)
            if calls is not None:
                deltas = [{"index": k, **call} for k, call in enumerate(_tool_calls(calls))]
                return {"index": index, "delta": {"tool_calls": deltas}, "finish_reason": "tool_calls",
                        "logprobs": self._held_logprobs(state)}
        if state.mode == "text" or reason is not None:  # not a call: what was held, as text
            text, state.held = state.held, ""
            logprobs = self._held_logprobs(state)
            if not text and logprobs is None and reason is None:
                return None
            return {"index": index, "delta": {"content": text} if text or reason is None else {},
                    "logprobs": logprobs, "finish_reason": reason}
        return None

    def _held_logprobs(self, state: "_ChoiceState") -> Optional[dict]:
        held, state.held_logprobs = state.held_logprobs, []
        return {"content": held} if self.sampling.logprobs and held else None


class _ChoiceState:
    """What a stream remembers of one choice between its chunks."""

    def __init__(self, context: List[int]):
        self.started = False
        self.context = context  # the token before the next delta's, to read its text after
        self.offset = 0  # text_offset of the next token
        self.mode: Optional[str] = None  # with tools: "call" or "text" once the answer shows which it is
        self.held = ""  # with tools: text not yet sent
        self.held_logprobs: List[dict] = []
