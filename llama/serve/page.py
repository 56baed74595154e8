"""The web page at `/`: a chat first, and a completion tab, on the same engines as the API.

The chat fills the window, its message box at the bottom, with a stop button while an answer streams;
a sent message can be edited and an answer retried, and past conversations are listed beside it (kept in
the browser's local storage, not on the server); the settings (model, system prompt, temperature, top p, max tokens, repetition penalty, seed) sit in a
side panel that folds away, and apply to both tabs. A model with a description (the demo model's text
is gibberish by design) shows it above the conversation.

Both tabs stream. Their functions are coroutines on the server's event loop that follow the engine
like the API does (llama.serve.watch), and Gradio's queue runs any number of them at once
(concurrency_limit=None), so users of the page batch together with each other and with API
clients; the engine's queue (`max_queue`) is the only bound. The tabs' functions are also Gradio's
API endpoints `/complete` and `/chat`:

    gradio_client.Client(url).predict("my new invention is the", 800, "stories15M", api_name="/complete")

returns the prompt followed by its completion; its arguments are the prompt, the seed, then (optional)
the model, temperature, top_p, max_tokens and repetition penalty. The same seed gives the same text;
a seed of -1, a new one each time (llama.cpp's convention). `/chat` takes the message, then (optional) the system prompt,
temperature, top_p, max_tokens, model, repetition penalty and seed, and keeps the conversation of its
client. Plain HTTP works too: POST `{"data": [...]}` to /gradio_api/call/complete, then GET
/gradio_api/call/complete/EVENT_ID for the events (docs/serving.md).

The page takes no files: Gradio's upload and deep-link routes are refused (403), and what Gradio
would write goes to a folder of this server's own, removed when it stops. A call that fails prints
no traceback (Gradio's messages quote a call's inputs, and prompts are never logged), and its
message reads as a sentence. Tokenizing, and fitting a chat's history into the context, run in a
worker thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import atexit
import hmac
import logging
import re
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

MAX_SEED = 2**63 - 1
TEMPERATURE, TOP_P, MAX_TOKENS = 0.6, 0.9, 256  # the page's defaults: Meta's sampling, not OpenAI's
MAX_HISTORY = 1000  # messages of a chat the page takes: far more than fit any context
_NO_FILES = ("/gradio_api/upload", "/gradio_api/deep_link")  # Gradio routes that write files
# The conversation fills the window: the chat tab and everything in it grow to the height left.
CSS = """
.tabs:has(#chat-tab) { display: flex; flex-direction: column; }
#chat-tab, #chat-tab > .column, #chat-tab > .column > .column { flex: 1 1 0; min-height: 0; }
#conversation { flex: 1 1 0; min-height: 240px; }
#notice { padding: 6px 12px; border-radius: 6px; background: var(--color-accent-soft); }
"""


def sentence(message: str) -> str:
    """An error as the page shows it: a sentence (capital first, full stop last), names in typographic
    quotes rather than Python's."""
    text = re.sub(r"(?<![\w])'([^'\n]{1,200})'(?![\w])", "\u201c\\1\u201d", message.strip())
    if not text:
        return "Something went wrong."
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _error(message: str) -> gr.Error:
    return gr.Error(sentence(message), print_exception=False)


def _sampling(seed: Optional[float], temperature: float, top_p: float, repetition_penalty: float = 1.0) -> Sampling:
    """The page's sampling; a seed of -1 (or none) draws a new one for each answer, as llama.cpp's page does."""
    if seed is not None and seed != -1 and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}, or -1 for a new one each time")
    return Sampling(SamplingParams(temperature=float(temperature), top_p=float(top_p),
                                   repetition_penalty=float(repetition_penalty or 1.0),
                                   seed=None if seed is None or seed == -1 else int(seed)), stream=True)


def _fail(e: Exception) -> gr.Error:
    return _error(e.message if isinstance(e, APIError) else str(e))


async def _growing(watch, text: str) -> AsyncIterator[str]:
    """`text` followed by the watch's output, each time it grows; a Gradio error if generation fails."""
    try:
        async for change in watch.changes():
            if change.finish_reason == "error":
                raise _error(failure_message(watch.error(change.index), watch.failure is not None))
            if change.delta is not None and change.delta.text:
                text += change.delta.text
                yield text
    finally:
        watch.cancel()


def build_page(service: Service) -> gr.Blocks:
    """The page; its functions submit to `service` (the models may still be loading when this runs)."""
    async def complete(prompt: str, seed: Optional[float] = None, model: Optional[str] = None,
                       temperature: float = TEMPERATURE, top_p: float = TOP_P, max_tokens: float = MAX_TOKENS,
                       repetition_penalty: float = 1.0) -> AsyncIterator[str]:
        """The prompt and its completion, as it grows."""
        try:
            with await service.admit(model or None) as m:
                generator = m.llama
                tokens = await asyncio.to_thread(generator.tokenizer.encode, prompt or "", bos=True, eos=False)
                room = generator.max_seq_len - len(tokens)
                if room < 1:
                    raise _error(f"the prompt is {len(tokens)} tokens long: this model's context is "
                                 f"{generator.max_seq_len} tokens; shorten it")
                watch = service.watch(m, [tokens], _sampling(seed, temperature, top_p, repetition_penalty),
                                      [min(int(max_tokens), room)])
        except (APIError, ValueError) as e:
            raise _fail(e) from None
        yield prompt or ""
        async for text in _growing(watch, prompt or ""):
            yield text

    async def chat(message: str, history: List[dict], system: str = "", temperature: float = TEMPERATURE,
                   top_p: float = TOP_P, max_tokens: float = MAX_TOKENS, model: Optional[str] = None,
                   repetition_penalty: float = 1.0, seed: Optional[float] = None) -> AsyncIterator[str]:
        """The assistant's answer to the conversation so far, as it grows."""
        try:
            with await service.admit(model or None) as m:
                generator = m.llama
                prompt = await asyncio.to_thread(chat_prompt, generator, system, history, message, int(max_tokens))
                room = generator.max_seq_len - len(prompt)
                watch = service.watch(m, [prompt], _sampling(seed, temperature, top_p, repetition_penalty),
                                      [min(int(max_tokens), room)], decode_after=[])
        except (APIError, ValueError) as e:
            raise _fail(e) from None
        async for text in _growing(watch, ""):
            yield text

    choices = service.choices()
    longest = max(service.max_seq_len(name) for name in service.pool.names) - 1
    with _Page(title="llama", analytics_enabled=False, fill_height=True) as page:
        with gr.Sidebar(label="Settings", open=True, elem_id="settings"):
            # allow_custom_value: an API call may name an adapter loaded since, or a model not served (a 404
            # in words), rather than meet Gradio's own refusal
            model = gr.Dropdown(choices, value=service.default, label="Model", elem_id="model",
                                info="Each model answers on its own.", allow_custom_value=True)
            system = gr.Textbox(label="System prompt", lines=3, value="", elem_id="system",
                                placeholder="How the assistant should answer (the chat only)")
            temperature = gr.Slider(0, 2, value=TEMPERATURE, step=0.05, label="Temperature", elem_id="temperature")
            top_p = gr.Slider(0.05, 1, value=TOP_P, step=0.05, label="Top p", elem_id="top_p")
            max_tokens = gr.Slider(1, longest, value=min(MAX_TOKENS, longest), step=1, label="Max tokens",
                                   elem_id="max_tokens")
            repetition_penalty = gr.Slider(1, 2, value=1, step=0.05, label="Repetition penalty",
                                           elem_id="repetition_penalty")
            seed = gr.Number(value=-1, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed", elem_id="seed",
                             info="The same seed gives the same text; -1: a new one each time.")
        notice = gr.Markdown(service.description(service.default), visible=bool(service.description(service.default)),
                             elem_id="notice")
        with gr.Tabs():
            with gr.Tab("Chat", elem_id="chat-tab", scale=1):
                conversation = gr.Chatbot(label=service.default, show_label=False, elem_id="conversation",
                                          height="100%", placeholder=_placeholder(service.default),
                                          buttons=["copy"])
                _Chat(
                    chat, chatbot=conversation,
                    textbox=gr.Textbox(placeholder="Type a message, then Enter", show_label=False, lines=1,
                                       max_lines=8, elem_id="message", submit_btn=True, stop_btn=True),
                    additional_inputs=[system, temperature, top_p, max_tokens, model, repetition_penalty, seed],
                    concurrency_limit=None, api_name="chat", analytics_enabled=False, fill_height=True,
                    save_history=True, editable=True)
            with gr.Tab("Completion", elem_id="completion-tab"):
                prompt = gr.Textbox(label="Prompt", lines=3, value="Once upon a time", elem_id="prompt")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", visible=False, elem_id="stop")
                output = gr.Textbox(label="Text", lines=14, interactive=False, elem_id="completion", buttons=["copy"])
                running = generate.click(lambda: (gr.Button(visible=False), gr.Button(visible=True)), None,
                                         [generate, stop], queue=False, api_visibility="private")
                streaming = running.then(complete, [prompt, seed, model, temperature, top_p, max_tokens,
                                                    repetition_penalty], output, api_name="complete",
                                         concurrency_limit=None)
                done = lambda: (gr.Button(visible=True), gr.Button(visible=False))  # noqa: E731
                streaming.then(done, None, [generate, stop], queue=False, api_visibility="private")
                streaming.failure(done, None, [generate, stop], queue=False, api_visibility="private")
                stop.click(done, None, [generate, stop], cancels=[streaming], queue=False, api_visibility="private")
        model.change(lambda name: (gr.Markdown(service.description(name), visible=bool(service.description(name))),
                                   gr.Chatbot(label=name, placeholder=_placeholder(name))),
                     model, [notice, conversation], queue=False, api_visibility="private")
        # Adapters loaded since the page was built: the choices as they are when someone opens it.
        page.load(lambda: gr.Dropdown(choices=service.choices()), None, model, queue=False, api_visibility="private")
    page.queue(default_concurrency_limit=None)
    return page


def _placeholder(name: str) -> str:
    return f"**{name}**\n\nType a message below. The settings are in the side panel."


class _Chat(gr.ChatInterface):
    """Gradio's ChatInterface, whose message box comes back after an answer that failed. Gradio 6 runs no `.then`
    step after a step that raised, so its own box would stay disabled behind its stop button: here a failure
    (shown as a pop-up) puts the message back in the box, to edit and send again, and the conversation back
    as it was before it."""

    def _setup_stop_events(self, event_triggers, events_to_cancel, after_success) -> None:
        super()._setup_stop_events(event_triggers, events_to_cancel, after_success)
        placeholder = self.textbox.placeholder

        def restore(saved, history):
            text = saved if isinstance(saved, str) else ""
            return gr.Textbox(value=text, interactive=True, submit_btn=True, stop_btn=False,
                              placeholder=placeholder), history

        for event in events_to_cancel:
            event.failure(restore, [self.saved_input, self.chatbot_state], [self.textbox, self.chatbot], queue=False,
                          api_visibility="undocumented")


class _Page(gr.Blocks):
    """The page's Blocks, whose calls may leave out their last values (the page's defaults then), and whose failed
    calls print no traceback. Gradio prints one for any error but a gr.Error, and its messages may quote the
    call's inputs (a short call's "Received inputs: [...]", a prompt): the client gets the error, the log its
    type and where it happened, never its message."""

    async def process_api(self, block_fn, inputs, *args, **kwargs):
        fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
        name = fn.api_name or fn.name
        if kwargs.get("iterator") is None and isinstance(inputs, list) and len(inputs) < len(fn.inputs):
            if not inputs:
                raise _error(f"/{name} takes up to {len(fn.inputs)} values and got none: send at least the first")
            # The values left out are the page's defaults, as gradio_client fills them in (Gradio would fail on
            # the short list, quoting it in its log).
            inputs = inputs + [getattr(c, "value", None) for c in fn.inputs[len(inputs):]]
        try:
            return await super().process_api(block_fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except ComponentProcessingError as e:  # a value the call sent that its component refuses: the caller's
            raise _error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a bug or a malformed call: answered, and logged without its text
            log.error("the page's /%s failed with %s (its message is not logged: it may quote the input)\n%s",
                      name, type(e).__name__, "".join(traceback.format_tb(e.__traceback__)).rstrip())
            raise _error(f"/{name} failed ({type(e).__name__}): check the values sent") from None


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
    # footer_links=[]: no footer under the message box; and no "Use via API" page, whose cURL recipe fails in bash
    # (`| read EVENT_ID` runs in a subshell): docs/serving.md shows the calls that work.
    gr.mount_gradio_app(app, build_page(service), path="/", auth=auth, ssr_mode=False, run_history=False, css=CSS,
                        footer_links=[],
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


def _dialog(generator, system: str, history: List[dict], message: str) -> List[dict]:
    """The conversation as a dialog; the model's own answers lose any reserved chat tag they wrote, which
    would make every later prompt refuse the history."""
    dialog = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history:
        if m.get("role") not in ("user", "assistant"):
            continue
        text = _text(m.get("content"))
        if m["role"] == "assistant":
            text = strip_reserved_tags(generator.tokenizer, text, generator.chat_format)
        if dialog and dialog[-1]["role"] == m["role"]:  # Gradio may split one turn into several messages
            dialog[-1]["content"] += text
        else:
            dialog.append({"role": m["role"], "content": text})
    return dialog + [{"role": "user", "content": message}]


def chat_prompt(generator, system: str, history: List[dict], message: str, max_tokens: int) -> List[int]:
    """The prompt tokens answering `message` after `history` (at most MAX_HISTORY messages)."""
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        size = len(history) if isinstance(history, list) else type(history).__name__
        raise ValueError(f"the conversation holds {size} messages, more than the page keeps ({MAX_HISTORY}): "
                         "clear it and start a new one")
    return _fit(generator, _dialog(generator, system, history, message), max_tokens)


def _fit(generator, dialog: List[dict], max_tokens: int) -> List[int]:
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
            encoded[keep] = generator.encode_dialog(head + turns[len(turns) - 1 - 2 * keep:])
        return encoded[keep]

    def fits(keep: int) -> bool:
        return len(prompt(keep)) + max_tokens <= generator.max_seq_len

    most = min(len(turns) // 2, generator.max_seq_len // 2)
    good, bad = 0, most + 1  # fits(good) or good == 0; not fits(bad) or bad > most
    keep = 1
    while keep <= most and fits(keep):
        good, keep = keep, keep * 2
    bad = min(bad, keep)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    tokens = prompt(good)
    if len(tokens) >= generator.max_seq_len:
        raise ValueError(f"the message does not fit in this model's context of {generator.max_seq_len} tokens: "
                         "shorten it")
    return tokens
