"""The web page at `/`: a Gradio app with a completion tab and a chat tab, on the same engine as the API.

Both tabs stream. Their functions are coroutines on the server's event loop that follow the engine
like the API does (llama.serve.watch), and Gradio's queue runs any number of them at once
(concurrency_limit=None), so users of the page batch together with each other and with API
clients; the engine's queue (`max_queue`) is the only bound. The completion function is also
Gradio's API endpoint `/complete`:

    gradio_client.Client(url).predict("my new invention is the", 800, api_name="/complete")

returns the prompt followed by its completion; the arguments after the prompt are the seed, then
(optional) temperature, top_p and max_tokens. The same seed gives the same text.

The page takes no files: Gradio's upload and deep-link routes are refused (403), and what Gradio
would write goes to a folder of this server's own, removed when it stops. A call that fails prints
no traceback (Gradio's messages quote a call's inputs, and prompts are never logged). Tokenizing,
and fitting a chat's history into the context, run in a worker thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import atexit
import hmac
import logging
import shutil
import tempfile
import traceback
from typing import AsyncIterator, Callable, List, Optional

import gradio as gr
from fastapi import FastAPI
from gradio.exceptions import ComponentProcessingError
from starlette.responses import Response

from llama.chat_format import strip_reserved_tags
from llama.serve.errors import APIError, failure_message
from llama.sampling import SamplingParams
from llama.serve.params import Sampling
from llama.serve.service import Service

log = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
TEMPERATURE, TOP_P, MAX_TOKENS = 0.6, 0.9, 128  # the page's defaults: Meta's sampling, not OpenAI's
MAX_HISTORY = 1000  # messages of a chat the page takes: far more than fit any context
_NO_FILES = ("/gradio_api/upload", "/gradio_api/deep_link")  # Gradio routes that write files


def _sampling(seed: Optional[float], temperature: float, top_p: float, repetition_penalty: float = 1.0) -> Sampling:
    return Sampling(SamplingParams(temperature=float(temperature), top_p=float(top_p),
                                   repetition_penalty=float(repetition_penalty),
                                   seed=None if seed is None else int(seed)), stream=True)


def _fail(e: Exception) -> gr.Error:
    message = e.message if isinstance(e, APIError) else str(e)
    return gr.Error(message, print_exception=False)


async def _growing(watch, text: str) -> AsyncIterator[str]:
    """`text` followed by the watch's output, each time it grows; a Gradio error if generation fails."""
    try:
        async for change in watch.changes():
            if change.finish_reason == "error":
                raise gr.Error(failure_message(watch.error(change.index), watch.failure is not None),
                               print_exception=False)
            if change.delta is not None and change.delta.text:
                text += change.delta.text
                yield text
    finally:
        watch.cancel()


def build_page(service: Service) -> gr.Blocks:
    """The two tabs; their functions submit to `service` (the model may still be loading when this runs)."""
    async def complete(prompt: str, seed: float = 1, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                       max_tokens: float = MAX_TOKENS) -> AsyncIterator[str]:
        """The prompt and its completion, as it grows."""
        try:
            with await service.admit() as m:
                g = m.llama
                tokens = await asyncio.to_thread(g.tokenizer.encode, prompt or "", bos=True, eos=False)
                room = g.max_seq_len - len(tokens)
                if room < 1:
                    raise gr.Error(f"the prompt is {len(tokens)} tokens long: this model's context is "
                                   f"{g.max_seq_len} tokens; shorten it", print_exception=False)
                watch = service.watch(m, [tokens], _sampling(seed, temperature, top_p), [min(int(max_tokens), room)])
        except (APIError, ValueError) as e:
            raise _fail(e) from None
        yield prompt or ""
        async for text in _growing(watch, prompt or ""):
            yield text

    async def chat(message: str, history: List[dict], system: str = "", temperature: float = TEMPERATURE,
                   top_p: float = TOP_P, max_tokens: float = MAX_TOKENS) -> AsyncIterator[str]:
        """The assistant's answer to the conversation so far, as it grows."""
        try:
            with await service.admit() as m:
                g = m.llama
                prompt = await asyncio.to_thread(chat_prompt, g, system, history, message, int(max_tokens))
                room = g.max_seq_len - len(prompt)
                watch = service.watch(m, [prompt], _sampling(None, temperature, top_p), [min(int(max_tokens), room)],
                                      decode_after=[])
        except (APIError, ValueError) as e:
            raise _fail(e) from None
        async for text in _growing(watch, ""):
            yield text

    longest = service.max_seq_len(service.default) - 1
    with _Page(title=f"llama: {service.model_name}", analytics_enabled=False) as page:
        gr.Markdown(f"## {service.model_name}")
        with gr.Tab("Completion"):
            prompt = gr.Textbox(label="Prompt", lines=3, value="Once upon a time", elem_id="prompt")
            with gr.Row():
                seed = gr.Slider(0, MAX_SEED, value=1, step=1, label="Seed", elem_id="seed")
                temperature = gr.Slider(0, 2, value=TEMPERATURE, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, value=TOP_P, step=0.05, label="Top p")
                max_tokens = gr.Slider(1, longest, value=min(MAX_TOKENS, longest), step=1, label="Max tokens")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            output = gr.Textbox(label="Text", lines=12, interactive=False, elem_id="completion", buttons=["copy"])
            button.click(complete, [prompt, seed, temperature, top_p, max_tokens], output, api_name="complete",
                         concurrency_limit=None)
        with gr.Tab("Chat"):
            gr.ChatInterface(
                chat, additional_inputs=[
                    gr.Textbox(label="System prompt", value=""),
                    gr.Slider(0, 2, value=TEMPERATURE, step=0.05, label="Temperature"),
                    gr.Slider(0.05, 1, value=TOP_P, step=0.05, label="Top p"),
                    gr.Slider(1, longest, value=min(MAX_TOKENS * 2, longest), step=1, label="Max tokens")],
                concurrency_limit=None, api_name="chat", analytics_enabled=False, fill_height=False)
    page.queue(default_concurrency_limit=None)
    return page


class _Page(gr.Blocks):
    """The page's Blocks, whose failed calls print no traceback. Gradio prints one for any error but a
    gr.Error, and its messages may quote the call's inputs (a short call's "Received inputs: [...]", a
    prompt): the client gets the error, the log its type and where it happened, never its message."""

    async def process_api(self, block_fn, inputs, *args, **kwargs):
        fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
        name = fn.api_name or fn.name
        if kwargs.get("iterator") is None and inputs is not None and len(inputs) < len(fn.inputs):
            raise gr.Error(f"/{name} takes {len(fn.inputs)} values and got {len(inputs)}: send all of them "
                           "(gradio_client fills in the defaults)", print_exception=False)
        try:
            return await super().process_api(block_fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except ComponentProcessingError as e:  # a value the call sent that its component refuses: the caller's
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - a bug or a malformed call: answered, and logged without its text
            log.error("the page's /%s failed with %s (its message is not logged: it may quote the input)\n%s",
                      name, type(e).__name__, "".join(traceback.format_tb(e.__traceback__)).rstrip())
            raise gr.Error(f"/{name} failed ({type(e).__name__}): check the values sent", print_exception=False) \
                from None


def _no_files() -> Response:
    return APIError(403, "this page takes no files: uploads are refused", code="uploads_refused").response()


def mount_page(app: FastAPI, service: Service, api_key: Optional[str] = None) -> Callable[[], None]:
    """Mount the page at `/`; with an API key, behind a login form whose password is the key. Returns what
    ends the page's long-lived streams (Gradio's session heartbeats) and removes the page's files, for the
    server's stop."""
    auth = None
    if api_key:
        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    for path in _NO_FILES:  # before the mount, which would take every path
        app.add_api_route(path, _no_files, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                          include_in_schema=False)
    # run_history=False: no record of calls, and no page from which a user could send them to a Hub bucket.
    gr.mount_gradio_app(app, build_page(service), path="/", auth=auth, ssr_mode=False, run_history=False,
                        auth_message="Sign in with any user name and the server's API key as the password.")
    gradio_app = app.routes[-1].app  # the Mount just added
    # Gradio's file folder is shared by every Gradio app of the machine and outlives them: this server's own.
    gradio_app.uploaded_file_dir = tempfile.mkdtemp(prefix="llama-page-")
    atexit.register(shutil.rmtree, gradio_app.uploaded_file_dir, True)

    def stop() -> None:
        gradio_app.stop_event.set()
        shutil.rmtree(gradio_app.uploaded_file_dir, ignore_errors=True)

    return stop


def _text(content) -> str:
    """A Gradio message's text (its content may be a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if isinstance(content, dict):
        return content.get("text", "")
    return ""


def _dialog(g, system: str, history: List[dict], message: str) -> List[dict]:
    """The conversation as a dialog; the model's own answers lose any reserved chat tag they wrote, which
    would make every later prompt refuse the history."""
    dialog = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history:
        if m.get("role") not in ("user", "assistant"):
            continue
        text = _text(m.get("content"))
        if m["role"] == "assistant":
            text = strip_reserved_tags(g.tokenizer, text, g.chat_format)
        if dialog and dialog[-1]["role"] == m["role"]:  # Gradio may split one turn into several messages
            dialog[-1]["content"] += text
        else:
            dialog.append({"role": m["role"], "content": text})
    return dialog + [{"role": "user", "content": message}]


def chat_prompt(g, system: str, history: List[dict], message: str, max_tokens: int) -> List[int]:
    """The prompt tokens answering `message` after `history` (at most MAX_HISTORY messages)."""
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        size = len(history) if isinstance(history, list) else type(history).__name__
        raise ValueError(f"the conversation holds {size} messages, more than the page keeps ({MAX_HISTORY}): "
                         "clear it and start a new one")
    return _fit(g, _dialog(g, system, history, message), max_tokens)


def _fit(g, dialog: List[dict], max_tokens: int) -> List[int]:
    """The prompt of `dialog` with as many of its newest exchanges as leave max_tokens (or at least one
    token) free.

    Each message costs at least one token, so exchanges older than the newest max_seq_len // 2 never fit.
    Among those, the number kept is found by doubling, then halving: a few encodes of the newest part
    of the conversation, not one encode of it all per exchange dropped.
    """
    head = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(head):]  # (user, assistant) exchanges, then the new user message

    encoded = {}

    def prompt(keep: int) -> List[int]:  # the newest `keep` exchanges and the new message
        if keep not in encoded:
            encoded[keep] = g.encode_dialog(head + turns[len(turns) - 1 - 2 * keep:])
        return encoded[keep]

    def fits(keep: int) -> bool:
        return len(prompt(keep)) + max_tokens <= g.max_seq_len

    most = min(len(turns) // 2, g.max_seq_len // 2)
    good, bad = 0, most + 1  # fits(good) or good == 0; not fits(bad) or bad > most
    keep = 1
    while keep <= most and fits(keep):
        good, keep = keep, keep * 2
    bad = min(bad, keep)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    tokens = prompt(good)
    if len(tokens) >= g.max_seq_len:
        raise ValueError(f"the message does not fit in this model's context of {g.max_seq_len} tokens: shorten it")
    return tokens
