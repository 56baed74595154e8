"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's request and response shapes.

A request becomes one engine request per prompt and choice (`Service.watch`); the answer is built
from their completions, whole or as server-sent events (`data: {json}` chunks, then
`data: [DONE]`). Streamed and whole answers read the same text, so they agree exactly.

Where OpenAI leaves room, this server chooses: a request cut short by a server shutdown ends with
finish_reason "length" (the answer is incomplete; OpenAI has no other value for that); logprobs
give the chosen tokens' log-probabilities, never alternatives (`top_logprobs` is null, or empty
lists in chat); a failure in the engine is a 500, or in a stream an `error` event.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Dict, List, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llama.generation import Completion, Delta, Llama
from llama.serve import params
from llama.serve.errors import APIError, failure_message, invalid
from llama.serve.params import Sampling
from llama.serve.service import Service
from llama.serve.watch import Change, Watch

CLIENT_GONE = 499  # the status counted for a whole answer whose client left first (nobody reads it)
_DISCONNECT_POLL_S = 0.5  # how often a whole (not streamed) answer checks that its client is still there


async def completions(service: Service, request: Request, body: dict) -> Response:
    req = params.parse(params.CompletionRequest, body)
    sampling, texts = req.sampling(), req.prompt
    g = service.admit()
    try:
        prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    except ValueError as e:  # e.g. a lone surrogate
        raise invalid(f"prompt: {e}", "prompt") from None
    max_new = [_max_new(g, len(p), sampling.max_tokens, "prompt") for p in prompts]
    watch = service.watch(prompts, sampling, max_new)
    answer = _Answer(g, service.model_name, "cmpl", "text_completion", sampling, prompts, texts)
    if sampling.stream:
        return _sse(answer.stream(watch))
    if not await _wait(watch, request):
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(answer.whole(watch))


async def chat_completions(service: Service, request: Request, body: dict) -> Response:
    req = params.parse(params.ChatRequest, body)
    sampling, dialog = req.sampling(), req.dialog()
    g = service.admit()
    try:
        prompt = g.encode_dialog(dialog)
    except ValueError as e:  # reserved chat tags, roles out of order
        raise invalid(f"messages: {e}", "messages") from None
    max_new = [_max_new(g, len(prompt), sampling.max_tokens, "messages")]
    watch = service.watch([prompt], sampling, max_new, decode_after=[])
    answer = _Answer(g, service.model_name, "chatcmpl", "chat.completion", sampling, [prompt], None)
    if sampling.stream:
        return _sse(answer.stream(watch))
    if not await _wait(watch, request):
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(answer.whole(watch))


def _max_new(g: Llama, prompt_len: int, max_tokens: Optional[int], what: str) -> int:
    """max_tokens, or all the room left; 400 when the prompt and max_tokens overflow max_seq_len."""
    limit = g.max_seq_len
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


def _engine_error(watch: Watch, index: int) -> APIError:
    """The 500 of a completion that failed, or that the engine left open when it died."""
    return APIError(500, failure_message(watch.error(index), watch.failure is not None), code="engine_error")


class _Answer:
    """The response of one request: its id, its choices' text and log-probabilities, its usage."""

    def __init__(self, g: Llama, model: str, prefix: str, kind: str, sampling: Sampling, prompts: List[List[int]],
                 texts: Optional[List[str]]):
        self.g, self.model, self.kind, self.sampling = g, model, kind, sampling
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
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                echo = self.texts[self._prompt_of(index)] if self.sampling.echo else ""
                choice["text"] = echo + c.text
            choice["logprobs"] = self._logprobs(c, c.prompt_tokens[-1:], c.tokens, c.logprobs, self.sampling.echo)
            choice["finish_reason"] = finish_reason(c.finish_reason)
            choices.append(choice)
        return {**self._head(self.kind), "choices": choices, "usage": self.usage(completions)}

    def _logprobs(self, c: Completion, context: List[int], tokens: List[int], logprobs: List[Optional[float]],
                  echo: bool, offset: int = 0) -> Optional[dict]:
        """The logprobs object of `tokens` (read after `context`), with the prompt's first if `echo`."""
        if not self.sampling.logprobs:
            return None
        if echo:
            context, tokens, logprobs = [], c.prompt_tokens + tokens, [None] + c.prompt_logprobs + logprobs
        strings = self._token_strings(context, tokens)
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                                for s, lp in zip(strings, logprobs)]}
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": strings, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}

    def _token_strings(self, context: List[int], tokens: List[int]) -> List[str]:
        """Each token's text as it reads after the one before it (so SentencePiece's spaces stay)."""
        out = []
        for t in tokens:
            out.append(self.g.decode_continuation(context, [t]))
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
            logprobs = self._logprobs(c, state.context, delta.tokens, delta.logprobs, echo, state.offset)
            if delta.tokens:
                state.context = delta.tokens[-1:]
            if not self.chat:
                state.offset += sum(len(s) for s in logprobs["tokens"])
        reason = None if change.finish_reason is None else finish_reason(change.finish_reason)
        if not text and logprobs is None and reason is None:
            return None
        body = {"delta": {"content": text} if text or reason is None else {}} if self.chat else {"text": text}
        return {"index": change.index, **body, "logprobs": logprobs, "finish_reason": reason}


class _ChoiceState:
    """What a stream remembers of one choice between its chunks."""

    def __init__(self, context: List[int]):
        self.started = False
        self.context = context  # the token before the next delta's, to read its text after
        self.offset = 0  # text_offset of the next token
