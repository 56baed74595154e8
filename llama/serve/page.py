"""The web page at `/`: a Gradio app with a completion tab and a chat tab, on the same engine as the API.

Both tabs stream. Their functions are coroutines on the server's event loop that follow the engine
like the API does (llama.serve.watch), and Gradio's queue runs any number of them at once
(concurrency_limit=None), so users of the page batch together with each other and with API
clients; the engine's queue (`max_queue`) is the only bound. The completion function is also
Gradio's API endpoint `/complete`:

    gradio_client.Client(url).predict("my new invention is the", 800, api_name="/complete")

returns the prompt followed by its completion; the arguments after the prompt are the seed, then
(optional) temperature, top_p and max_tokens. The same seed gives the same text.
"""
from __future__ import annotations

import hmac
from typing import AsyncIterator, Callable, List, Optional

import gradio as gr
from fastapi import FastAPI

from llama.chat_format import strip_reserved_tags
from llama.serve.errors import APIError
from llama.serve.params import Sampling
from llama.serve.service import Service

MAX_SEED = 2**31 - 1
TEMPERATURE, TOP_P, MAX_TOKENS = 0.6, 0.9, 128  # the page's defaults: Meta's sampling, not OpenAI's


def _sampling(seed: Optional[float], temperature: float, top_p: float) -> Sampling:
    return Sampling(max_tokens=None, temperature=float(temperature), top_p=float(top_p), top_k=0,
                    seed=None if seed is None else int(seed), stop=[], n=1, stream=True, include_usage=False,
                    logprobs=False)


def _fail(e: Exception) -> gr.Error:
    message = e.message if isinstance(e, APIError) else str(e)
    return gr.Error(message, print_exception=False)


async def _growing(watch, text: str) -> AsyncIterator[str]:
    """`text` followed by the watch's output, each time it grows; a Gradio error if generation fails."""
    try:
        async for change in watch.changes():
            if change.finish_reason == "error":
                error = watch.error(change.index)
                raise gr.Error(f"generation failed: {type(error).__name__}: {error}", print_exception=False)
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
            g = service.admit()
            tokens = g.tokenizer.encode(prompt or "", bos=True, eos=False)
            room = g.max_seq_len - len(tokens)
            if room < 1:
                raise gr.Error(f"the prompt is {len(tokens)} tokens long: this model's context is "
                               f"{g.max_seq_len} tokens; shorten it", print_exception=False)
            watch = service.watch([tokens], _sampling(seed, temperature, top_p), [min(int(max_tokens), room)])
        except (APIError, ValueError) as e:
            raise _fail(e) from None
        yield prompt or ""
        async for text in _growing(watch, prompt or ""):
            yield text

    async def chat(message: str, history: List[dict], system: str = "", temperature: float = TEMPERATURE,
                   top_p: float = TOP_P, max_tokens: float = MAX_TOKENS) -> AsyncIterator[str]:
        """The assistant's answer to the conversation so far, as it grows."""
        try:
            g = service.admit()
            dialog = _dialog(g, system, history, message)
            prompt = _fit(g, dialog, int(max_tokens))
            room = g.max_seq_len - len(prompt)
            watch = service.watch([prompt], _sampling(None, temperature, top_p), [min(int(max_tokens), room)],
                                  decode_after=[])
        except (APIError, ValueError) as e:
            raise _fail(e) from None
        async for text in _growing(watch, ""):
            yield text

    longest = service.max_seq_len - 1
    with gr.Blocks(title=f"llama: {service.model_name}", analytics_enabled=False) as page:
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


def mount_page(app: FastAPI, service: Service, api_key: Optional[str] = None) -> Callable[[], None]:
    """Mount the page at `/`; with an API key, behind a login form whose password is the key. Returns what
    ends the page's long-lived streams (Gradio's session heartbeats), for the server's stop."""
    auth = None
    if api_key:
        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    gr.mount_gradio_app(app, build_page(service), path="/", auth=auth, ssr_mode=False,
                        auth_message="Sign in with any user name and the server's API key as the password.")
    gradio_app = app.routes[-1].app  # the Mount just added
    return lambda: gradio_app.stop_event.set()


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


def _fit(g, dialog: List[dict], max_tokens: int) -> List[int]:
    """The prompt of `dialog` without its oldest exchanges, until it leaves max_tokens (or at least one
    token) free."""
    head = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(head):]
    while True:
        prompt = g.encode_dialog(head + turns)
        if len(prompt) + max_tokens <= g.max_seq_len or len(turns) == 1:
            break
        turns = turns[2:]
    if len(prompt) >= g.max_seq_len:
        raise ValueError(f"the message does not fit in this model's context of {g.max_seq_len} tokens: shorten it")
    return prompt
