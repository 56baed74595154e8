"""The OpenAI-compatible API, through the official `openai` client, on one server in a thread of this process.

Answers are compared with a second Llama on the same weights that serves nothing (`ref`): over HTTP a
request must get exactly what the library gives it alone.
"""
import json
import logging
import re
import select
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra: pip install -e '.[serve]'")

from conftest import PROBE, probe  # noqa: E402
from llama import Llama  # noqa: E402
from llama.pool import ModelPool, ModelSpec  # noqa: E402
from llama.serve import ServeConfig, Service, create_app  # noqa: E402
from llama.serve.server import serve_in_thread  # noqa: E402

MODEL, MAX_SEQ_LEN, BODY_LIMIT, KEY = "tiny-test", 96, 64 * 1024, "sekret-key"
PROMPTS = ["The cat", "A dog ran to the park", "Once", "The happy bird sang in the garden with a friend",
           "Two", "One little fish", "The king and the queen", "A red ball"]


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> Llama:
    return Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    """4 slots: of 16 concurrent requests, most wait for one."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu")
    with serve_in_thread(g, model_name=MODEL, config=ServeConfig(page=False, max_body_bytes=BODY_LIMIT)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(ref, prompt, n):
    return ref.text_completion([prompt], temperature=0, max_gen_len=n)[0]["generation"]


@pytest.fixture(scope="module")
def probe_text(ref):
    """What the probe request (conftest.PROBE) must get from every server here, before and after each abuse."""
    return greedy(ref, PROBE["prompt"], PROBE["max_tokens"])


def stream_text(stream):
    """The text and finish_reason of choice 0, and the usage, of a streamed answer."""
    text, reason, usage = "", None, None
    for chunk in stream:
        for choice in chunk.choices:
            part = choice.text if hasattr(choice, "text") else choice.delta.content
            text += part or ""
            reason = choice.finish_reason or reason
        usage = chunk.usage or usage
    return text, reason, usage


def test_completion_equals_the_library_with_usage(client, ref):
    r = client.completions.create(model=MODEL, prompt="The cat", max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == greedy(ref, "The cat", 20)
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    prompt_tokens = len(ref.tokenizer.encode("The cat", bos=True, eos=False))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens, 20, prompt_tokens + 20)
    # max_tokens defaults to 16, as OpenAI's
    assert client.completions.create(model=MODEL, prompt="The cat", temperature=0).usage.completion_tokens == 16


def test_a_repeated_prompt_reports_its_cached_tokens_and_the_same_answer(client, ref):
    """usage.prompt_tokens_details.cached_tokens, as OpenAI and vLLM report it: the second time a long prompt
    comes, its full blocks of 16 positions come from the prefix cache; the answer does not change."""
    prompt = " ".join(PROMPTS)
    n = len(ref.tokenizer.encode(prompt, bos=True, eos=False))
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    chat = [{"role": "user", "content": prompt}]
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert again.choices[0].text == first.choices[0].text == greedy(ref, prompt, 8)
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    chat_first = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=4, temperature=0)
    chat_again = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=4, temperature=0)
    assert chat_again.choices[0].message.content == chat_first.choices[0].message.content
    assert chat_again.usage.prompt_tokens_details.cached_tokens >= 16


def test_health_turns_ready_only_once_the_engine_serves(tiny_ckpt, monkeypatch):
    """A request taken before serve_forever runs would, under model parallelism, run the ranks' agreement
    on the event loop's thread: Service.start hands the model out only once the engine serves."""
    from llama.serve import Service

    g = Llama.build(str(tiny_ckpt), max_seq_len=32, max_batch_size=1, device="cpu")
    entered = threading.Event()
    serve = g.serve_forever

    def slow_start(on_ready=None):
        entered.set()
        time.sleep(0.5)  # the thread is slow to get going
        serve(on_ready)

    monkeypatch.setattr(g, "serve_forever", slow_start)
    service = Service(ModelPool(loaded={MODEL: g}), 32)
    seen = []
    watcher = threading.Thread(target=lambda: (entered.wait(10), seen.append(service.ready)))
    watcher.start()
    service.start()
    watcher.join(10)
    assert seen == [False] and service.ready
    service.stop()


def test_a_list_of_prompts_gets_a_choice_each(client, ref):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [greedy(ref, p, 8) for p in PROMPTS[:3]]
    assert r.usage.prompt_tokens == sum(len(ref.tokenizer.encode(p, bos=True, eos=False)) for p in PROMPTS[:3])


def test_streaming_equals_the_whole_answer(client):
    kwargs = dict(model=MODEL, prompt="A dog ran to the park", max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs)
    text, reason, usage = stream_text(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                                **kwargs))
    assert (text, reason) == (whole.choices[0].text, whole.choices[0].finish_reason)
    assert usage.model_dump() == whole.usage.model_dump()
    chat = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Tell me a story"}], max_tokens=25, temperature=0)
    whole = client.chat.completions.create(**chat)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    text, reason, _ = stream_text(client.chat.completions.create(stream=True, **chat))
    assert (text, reason) == (whole.choices[0].message.content, whole.choices[0].finish_reason)


def test_chat_answers_in_the_checkpoint_format(client, ref):
    dialog = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
              {"role": "user", "content": "Tell me about the cat"}]
    r = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=12, temperature=0)
    expected = ref.chat_completion([dialog], temperature=0, max_gen_len=12)[0]["generation"]["content"]
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(ref.encode_dialog(dialog))
    # content as a list of text parts, as newer clients send it
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about the cat"}]
    r2 = client.chat.completions.create(model=MODEL, messages=dialog[:2] + [{"role": "user", "content": parts}],
                                        max_tokens=12, temperature=0)
    assert r2.choices[0].message.content == expected


def test_stop_strings_cut_the_text_whole_and_streamed(client, ref):
    full = greedy(ref, "The happy bird", 40)
    stop = next(full[i : i + 2] for i in range(5, len(full) - 1) if full[i : i + 2].isalpha())
    cut = full[: full.index(stop)]
    for stops in (stop, ["zzzz", stop]):
        r = client.completions.create(model=MODEL, prompt="The happy bird", max_tokens=40, temperature=0, stop=stops)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
        text, reason, _ = stream_text(client.completions.create(model=MODEL, prompt="The happy bird", max_tokens=40,
                                                                temperature=0, stop=stops, stream=True))
        assert (text, reason) == (cut, "stop")


def test_a_seed_repeats_and_n_choices_take_the_next_seeds(client, ref):
    kwargs = dict(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, top_p=0.95)
    first = client.completions.create(seed=7, **kwargs).choices[0].text
    assert client.completions.create(seed=7, **kwargs).choices[0].text == first
    assert client.completions.create(seed=8, **kwargs).choices[0].text != first
    assert first == ref.text_completion(["Once"], temperature=1.0, top_p=0.95, max_gen_len=16, seed=7)[0]["generation"]
    two = client.completions.create(seed=7, n=2, **kwargs)
    assert [c.text for c in two.choices] == [first, client.completions.create(seed=8, **kwargs).choices[0].text]
    # top_k (an extension): top_k=1 is greedy whatever the temperature
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=16, temperature=1.5, seed=3,
                                  extra_body={"top_k": 1})
    assert r.choices[0].text == greedy(ref, "Once", 16)


def test_logprobs_of_the_chosen_tokens(client, ref):
    prompt = ref.tokenizer.encode("The king", bos=True, eos=False)
    tokens, logprobs = ref.generate([prompt], max_gen_len=10, temperature=0, logprobs=True)
    r = client.completions.create(model=MODEL, prompt="The king", max_tokens=10, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(logprobs[0], abs=1e-4)
    assert len(lp.tokens) == len(tokens[0]) and lp.text_offset[0] == 0
    # streamed: the same log-probabilities, chunk by chunk
    streamed = []
    for chunk in client.completions.create(model=MODEL, prompt="The king", max_tokens=10, temperature=0, logprobs=1,
                                           stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(logprobs[0], abs=1e-4)
    # echo with max_tokens 0 scores the prompt: the log-probabilities of its tokens after the first
    r = client.completions.create(model=MODEL, prompt="The king", max_tokens=0, echo=True, logprobs=0)
    score = ref.score_tokens([(prompt[:1], prompt[1:])])[0]
    assert r.choices[0].text == "The king"
    assert r.choices[0].logprobs.token_logprobs[0] is None
    assert sum(r.choices[0].logprobs.token_logprobs[1:]) == pytest.approx(score.logprob, abs=1e-4)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(c.logprob <= 0 for c in content)


def _error(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


@pytest.mark.parametrize("fields, param, message", [
    (dict(max_tokens=-1), "max_tokens", "max_tokens=-1: input should be greater than or equal to 0"),
    (dict(temperature="hot"), "temperature", "temperature='hot': input should be a valid number"),
    (dict(temperature=-0.5), "temperature", "temperature=-0.5: input should be greater than or equal to 0"),
    (dict(top_p=0), "top_p", "top_p=0: input should be greater than 0"),
    (dict(top_p=1.5), "top_p", "top_p=1.5: input should be less than or equal to 1"),
    (dict(max_tokens=95), "max_tokens", "max_seq_len=96 tokens (the server's --max_seq_len)"),
    (dict(prompt="word " * 200), "prompt", "max_seq_len=96"),
    (dict(stop=["x", ""]), "stop", "must be a non-empty string"),
    (dict(stop=["x"] * 17), "stop", "stop holds 17 strings: at most 16 stop strings are allowed"),
    (dict(stop=["ok", "x" * 257]), "stop", "stop[1] is 257 characters long: a stop string may have at most 256"),
    (dict(stop={"a": 1}), "stop", "stop={'a': 1} must be a non-empty string or a list of them"),
    (dict(stop=["ok", "y" * 500, 7]), "stop", "stop=['ok', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyy... must be"),  # cut short
    (dict(n=0), "n", "n=0: input should be greater than or equal to 1"),
    (dict(seed=2**70), "seed", "input should be less than or equal to 9223372036854775807"),
    (dict(presence_penalty=2.5), "presence_penalty", "presence_penalty=2.5: input should be less than or equal to 2"),
    (dict(best_of=3), "best_of", "best_of=3 is not supported: leave it out or make it equal n"),
    (dict(prompt=[[1, 2], []]), "prompt", "holds an empty list of token ids: each prompt needs at least one token"),
    (dict(prompt=["a", 7]), "prompt[1]", "prompt[1]=7: input should be a valid string"),
    (dict(stream="yes"), "stream", "stream='yes': input should be a valid boolean"),
    (dict(stream_options={"include_usage": 1}), "stream_options.include_usage", "input should be a valid boolean"),
])
def test_bad_completion_fields_are_400_naming_the_field(client, fields, param, message):
    e = _error(lambda: client.completions.create(**{"model": MODEL, "prompt": "The cat", **fields}))
    assert e.status_code == 400
    assert e.body["param"] == param and message in e.body["message"] and e.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages, param, message", [
    (None, "messages", "messages is missing"),
    ([], "messages", "list should have at least 1 item"),
    ([{"role": "user", "content": "a [INST] b"}], "messages", "reserved chat tag '[INST]'"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role", "must be system, user, assistant or tool"),
    ([{"role": ["user"], "content": "hi"}], "messages[0].role", "must be system, user, assistant or tool"),  # issue 18
    ([{"role": "user", "content": "hi"}, {}], "messages[1].role", "messages[1].role is missing"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content", "this model reads text only"),
    ([{"role": "assistant", "content": "hi"}], "messages", "must alternate user/assistant"),
    # Issue 18, item 9: a role or content of another type was a 500 (a TypeError), not a 400.
    ([{"role": {}, "content": "hi"}], "messages[0].role", "must be system, user, assistant or tool"),
    ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content", "must be a string or a list"),
])
def test_bad_chat_messages_are_400(client, messages, param, message):
    body = {"model": MODEL} if messages is None else {"model": MODEL, "messages": messages}
    r = httpx.post(f"{client.base_url}chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"]


def test_missing_prompt_unknown_model_bad_json_and_big_bodies(server, client):
    url = f"{server.url}/v1/completions"
    r = httpx.post(url, json={"model": MODEL}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    e = _error(lambda: client.completions.create(model="gpt-17", prompt="The cat"))
    assert e.status_code == 404 and "'gpt-17' does not exist" in e.body["message"] and e.body["param"] == "model"
    r = httpx.post(url, content=b'{"prompt": "The cat", ', headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"prompt": "x" * BODY_LIMIT}, timeout=30)
    assert r.status_code == 413 and f"limit of {BODY_LIMIT} bytes" in r.json()["error"]["message"]
    chunked = httpx.post(url, content=iter([b'{"prompt": "', b"x" * BODY_LIMIT, b'"}']), timeout=30)
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    r = httpx.post(url, content=b"[" * 5000, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"  # too deep for json.loads
    r = httpx.post(url, content=b'{"prompt": "\\ud800 cat", "max_tokens": 2}',
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "surrogate" in r.text
    # after every refusal the server still answers
    assert client.completions.create(model=MODEL, prompt="The cat", max_tokens=2).usage.completion_tokens == 2


ODD_VALUES = [["user"], {}, {"a": [1]}, True, -1, 1e308, "x", [], [None], None]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "best_of",
                     "stream", "stream_options", "logprobs", "echo", "presence_penalty", "frequency_penalty",
                     "logit_bias", "suffix", "user"]
CHAT_FIELDS = ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
               "functions"]


def test_odd_json_values_in_any_field_are_answered_never_a_500(server, probe_text):
    """The schema fuzzing of issue 18, bounded: every field, every JSON type; nested values in a chat message
    too. Each answer is a completion or an OpenAI-shaped 4xx, and the server's answers stay the same."""
    assert probe(server.url) == probe_text
    base = {"completions": {"prompt": "The cat", "max_tokens": 1},
            "chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}}
    cases = [("completions", {field: v}) for field in COMPLETION_FIELDS for v in ODD_VALUES]
    cases += [("chat/completions", {field: v}) for field in CHAT_FIELDS for v in ODD_VALUES]
    cases += [("chat/completions", {"messages": [{"role": "user", key: v}]}) for key in ("role", "content")
              for v in ODD_VALUES]
    with httpx.Client(timeout=60) as http:
        for route, fields in cases:
            r = http.post(f"{server.url}/v1/{route}", json={**base[route], **fields})
            assert r.status_code in (200, 400, 404), (route, fields, r.status_code, r.text)
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert probe(server.url) == probe_text


def test_sixteen_long_stop_strings_leave_another_stream_unchanged(server, ref, probe_text):
    """Issue 18, item 1: the most stop strings a request may have, each of the longest length, in 4 choices
    streaming beside another user's stream: the stream gets its text, and the check costs the same per token
    whatever the stops (tests/test_stream.py pins that)."""
    assert probe(server.url) == probe_text
    abusive = {"prompt": "The happy bird", "max_tokens": 60, "n": 4, "temperature": 1, "seed": 1, "stream": True,
               "stop": ["zq" * 128] * 15 + ["The happy bird" + "x" * 242]}
    other = {"prompt": "A dog ran to the park", "max_tokens": 40, "temperature": 0, "stream": True}
    answers = {}

    def stream(name, body):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            answers[name] = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                                    if line.startswith("data: {"))

    threads = [threading.Thread(target=stream, args=(name, body)) for name, body in (("abusive", abusive),
                                                                                       ("other", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers["other"] == greedy(ref, other["prompt"], 40)
    too_many = httpx.post(f"{server.url}/v1/completions", timeout=30, json={**abusive, "stop": ["y" * 90] * 600})
    assert too_many.status_code == 400 and "at most 16 stop strings" in too_many.json()["error"]["message"]
    assert len(too_many.text) < 1000  # the error does not echo the request
    assert probe(server.url) == probe_text


def test_a_client_that_leaves_while_sending_its_body_is_a_499_without_a_traceback(server, probe_text, caplog):
    """Issue 18, item 10: this was a logged traceback and a 500 in /metrics."""
    def count(status):
        return _samples(httpx.get(f"{server.url}/metrics").text).get(
            ("llama_http_responses_total", frozenset({("path", "/v1/completions"), ("status", status)})), 0)

    assert probe(server.url) == probe_text
    before = {status: count(status) for status in ("499", "500")}
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"The ca")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while count("499") == before["499"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (count("499"), count("500")) == (before["499"] + 1, before["500"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert probe(server.url) == probe_text


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/v1/nothing", 404, None),
    ("POST", "/v1/engines/davinci/completions", 404, None),
    ("GET", "/v1/completions", 405, "POST"),
    ("DELETE", "/v1/chat/completions", 405, "POST"),
    ("POST", "/v1/models", 405, "GET"),
    ("POST", "/health", 405, "GET, HEAD"),
    ("PUT", "/metrics", 405, "GET"),
])
def test_unknown_paths_and_wrong_methods_get_openai_errors(server, method, path, status, allow):
    """Issue 18, item 12: these were {"detail": "Not Found"} (and, with the page, Gradio's 404 for every one)."""
    check_unknown_route(server.url, method, path, status, allow)


def check_unknown_route(url, method, path, status, allow, headers=None):
    r = httpx.request(method, url + path, json={"prompt": "x"}, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == ("not_found" if status == 404 else "method_not_allowed")
    assert f"{method} {path}" in error["message"]
    if allow:
        assert r.headers["allow"] == allow and f"use {allow.replace(', ', ' or ')}" in error["message"]


def test_health_models_and_no_cors_by_default(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": MODEL, "loaded": [MODEL],
                                                        "models": {MODEL: {"state": "loaded", "load_s": None}}}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"] == MAX_SEQ_LEN  # as vLLM's
    preflight = httpx.options(f"{server.url}/v1/completions", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_16_concurrent_streams_each_equal_their_request_alone(client, ref, server):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " + str(i) for i in range(16)]
    alone = [greedy(ref, p, 24) for p in prompts]
    before = server.service.llama.engine.stats.steps
    got, errors = [None] * 16, []

    def one(i):
        try:
            got[i] = stream_text(client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24,
                                                           temperature=0, stream=True))[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and got == alone
    # they shared steps: 16 x 24 tokens one at a time would take 384 steps
    assert server.service.llama.engine.stats.steps - before < 200
    assert server.service.llama.engine.pending() == (0, 0)


@pytest.fixture(scope="module")
def slow(tiny_ckpt):
    """A server whose one step takes 20 ms: a request of 80 tokens runs for over a second."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    g.model.register_forward_hook(lambda *_: time.sleep(0.02))
    with serve_in_thread(g, model_name=MODEL, config=ServeConfig(page=False)) as s:
        yield s


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot(slow, stream, caplog):
    engine = slow.service.llama.engine
    finished, generated = engine.stats.requests_finished, engine.stats.generated_tokens
    body = {"model": MODEL, "prompt": "The cat", "max_tokens": 80, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=30) as http:
        if stream:
            with http.stream("POST", f"{slow.url}/v1/completions", json=body) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
                assert engine.pending()[1] == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{slow.url}/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while engine.pending() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pending() == (0, 0) and engine.stats.requests_finished == finished + 1
    assert engine.stats.generated_tokens - generated < 60  # cancelled, not run to its 80 tokens
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a client leaving is no error
    after = httpx.post(f"{slow.url}/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
    assert after.status_code == 200  # and the server goes on


def test_the_queue_bound_counts_only_requests_that_must_wait(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu")
    with serve_in_thread(g, model_name=MODEL, max_queue=0, config=ServeConfig(page=False)) as s:
        url = f"{s.url}/v1/completions"
        r = httpx.post(url, json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 4  # 4 free slots: nothing waits
        r = httpx.post(url, json={"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # could never fit
        assert "5 completions" in r.json()["error"]["message"] and "4 running + 0 waiting" in r.text


def test_max_tokens_0_counts_as_finished(server):
    stats = server.service.llama.engine.stats
    submitted, finished = stats.requests_submitted, stats.requests_finished
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The cat", "max_tokens": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ""
    assert (stats.requests_submitted - submitted, stats.requests_finished - finished) == (1, 1)


def test_a_request_whose_logits_turn_nan_gets_a_500_and_the_others_go_on(server, client, ref):
    g = server.service.llama
    poison = g.tokenizer.encode("The king", bos=True, eos=False)[-1]

    def nan_rows(module, inputs, output):  # rows that hold the poison token turn NaN
        return output.masked_fill((inputs[0] == poison).any(-1)[:, None, None], float("nan"))

    handle = g.model.tok_embeddings.register_forward_hook(nan_rows)
    try:
        e = _error(lambda: client.completions.create(model=MODEL, prompt="The king", max_tokens=5, temperature=0))
        streamed = httpx.post(f"{server.url}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "The king", "max_tokens": 5, "stream": True}).text
    finally:
        handle.remove()
    assert e.status_code == 500 and e.body["code"] == "engine_error" and "logits are NaN" in e.body["message"]
    assert '"code":"engine_error"' in streamed and "logits are NaN" in streamed
    assert client.completions.create(model=MODEL, prompt="The cat", max_tokens=8, temperature=0).choices[0].text == \
        greedy(ref, "The cat", 8)


def _samples(text):
    """{(name, frozenset of label pairs): value} of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_metrics_count_requests_tokens_and_time_to_first_token(server, client):
    engine = server.service.llama.engine
    model = frozenset({("model", MODEL)})
    before = _samples(httpx.get(f"{server.url}/metrics").text)
    client.completions.create(model=MODEL, prompt="The cat", max_tokens=5, temperature=0)
    _error(lambda: client.completions.create(model=MODEL, prompt="The cat", top_p=7))
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE llama_time_to_first_token_seconds histogram" in response.text
    assert "# TYPE llama_requests_submitted_total counter" in response.text
    after = _samples(response.text)
    assert after[("llama_requests_submitted_total", model)] == before[("llama_requests_submitted_total", model)] + 1
    assert after[("llama_generation_tokens_total", model)] == before[("llama_generation_tokens_total", model)] + 5
    assert after[("llama_requests_submitted_total", model)] == engine.stats.requests_submitted
    assert (after[("llama_requests_waiting", model)], after[("llama_requests_running", model)]) == (0, 0)
    count = ("llama_time_to_first_token_seconds_count", model)
    assert after[count] == before[count] + 1
    assert after[("llama_time_to_first_token_seconds_bucket", model | {("le", "+Inf")})] == after[count]
    bad = ("llama_http_responses_total", frozenset({("path", "/v1/completions"), ("status", "400")}))
    assert after[bad] == before.get(bad, 0) + 1
    for name in ("made-up-1", "made-up-2"):  # a path a client makes up is counted by its route: no new series
        assert httpx.get(f"{server.url}/v1/models/{name}").status_code == 404
    series = _samples(httpx.get(f"{server.url}/metrics").text)
    assert series[("llama_http_responses_total", frozenset({("path", "/v1/models/{name}"), ("status", "404")}))] == 2
    assert not [key for key in series if "made-up" in str(key)]


@pytest.fixture(scope="module")
def locked(tiny_ckpt):
    """A server with an API key and --cors; it lets clients fail many times before they wait (see `keyed`)."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    config = ServeConfig(page=False, api_key=KEY, cors=True, max_auth_failures=1000)
    with serve_in_thread(g, model_name=MODEL, config=config) as s:
        yield s


def test_the_api_key_guards_every_v1_route_and_metrics(locked):
    body = {"model": MODEL, "prompt": "The cat", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/metrics")):
            r = httpx.request(method, locked.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(locked.url + "/health").status_code == 200  # open, for load balancers
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=locked.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(**body).usage.completion_tokens == 2
    assert httpx.get(locked.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_unknown_paths_need_the_key_too(locked):
    assert httpx.get(locked.url + "/v1/nothing").status_code == 401
    check_unknown_route(locked.url, "GET", "/v1/nothing", 404, None, headers={"Authorization": f"Bearer {KEY}"})
    check_unknown_route(locked.url, "POST", "/health", 405, "GET, HEAD")  # /health stays open


@pytest.fixture(scope="module")
def keyed(tiny_ckpt):
    """A server with an API key and the default back-off for wrong keys."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    with serve_in_thread(g, model_name=MODEL, config=ServeConfig(page=False, api_key=KEY)) as s:
        yield s


def test_wrong_keys_are_throttled_per_client(keyed, probe_text):
    """Issue 18, item 15: 300 wrong keys in 0.2 s were all answered. After 5 in a row, a client waits 1 s, then
    2 s, 4 s, ... (at most 60 s) before each further try; a right key starts the count again."""
    good = {"Authorization": f"Bearer {KEY}"}
    assert probe(keyed.url, good) == probe_text
    url = keyed.url + "/v1/models"
    with httpx.Client(timeout=30) as http:
        assert {http.get(url).status_code for _ in range(10)} == {401}  # no key at all: not a guess
        answers = [http.get(url, headers={"Authorization": f"Bearer guess{i}"}) for i in range(40)]
        assert [r.status_code for r in answers[:5]] == [401] * 5 and {r.status_code for r in answers[5:]} == {429}
        refused = answers[-1]
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "too_many_failed_attempts"
        assert "retry in 1 s" in refused.json()["error"]["message"]
        assert http.get(url, headers=good).status_code == 429  # the right key waits too
        time.sleep(1.1)
        assert http.get(url, headers={"Authorization": "Bearer guess"}).status_code == 401
        assert http.get(url, headers=good).status_code == 429  # the sixth wrong key: 2 s now
        time.sleep(2.1)
        assert http.get(url, headers=good).status_code == 200
        assert http.get(url, headers={"Authorization": "Bearer guess"}).status_code == 401  # counted from 0 again
    assert probe(keyed.url, good) == probe_text


def test_a_key_http_cannot_carry_is_refused_at_start():
    """Issue 18, item 14: a non-ASCII key worked only when sent as latin-1 bytes; the openai client cannot send it."""
    service = Service(ModelPool([ModelSpec(MODEL, {})]), MAX_SEQ_LEN)
    for key in ("clé-secrète", "two words", "tab\there", "日本"):
        with pytest.raises(ValueError, match=r"api_key holds a character that is not visible ASCII \(at position "
                                             r"\d+\): a key must be letters, digits and punctuation"):
            create_app(service, ServeConfig(page=False, api_key=key))
    create_app(service, ServeConfig(page=False, api_key="Secr3t#~!"))


@pytest.fixture(scope="module")
def guarded(tiny_ckpt):
    """A server with short deadlines for a request's head and body, and room for 4 connections."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    config = ServeConfig(page=False, header_timeout_s=0.5, body_timeout_s=0.5, max_connections=4)
    with serve_in_thread(g, model_name=MODEL, config=config) as s:
        yield s


def connect(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def trickle(sock, head, byte=b"a", every=0.1, limit_s=10):
    """Send `head`, then `byte` every `every` seconds until the server answers (or `limit_s` passes); all the
    server sent before it closed the connection (b"" if it never answered)."""
    sock.sendall(head)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not select.select([sock], [], [], every)[0]:
        try:
            sock.sendall(byte)
        except OSError:
            break
    return read_until_closed(sock) if select.select([sock], [], [], 0)[0] else b""


def read_until_closed(sock):
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def test_slow_senders_are_cut_off_and_connections_bounded(guarded, probe_text):
    """Issue 18, item 4: 500 connections trickling their headers for 60 s all stayed open."""
    assert probe(guarded.url) == probe_text
    with connect(guarded.url) as sock:  # a head that never ends
        answer = trickle(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in answer, answer
    assert b"the request head took over 0.5 s to arrive" in answer
    with connect(guarded.url) as sock:  # a body that never ends
        answer = trickle(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100000\r\n\r\n{\"prompt\": \"")
    assert answer.startswith(b"HTTP/1.1 408 ") and b"the request body took over 0.5 s to arrive" in answer, answer
    idle = [connect(guarded.url) for _ in range(4)]  # the limit, taken by connections that send nothing
    try:
        with connect(guarded.url) as sock:
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower(), answer
        assert b"the server has 4 connections open, its limit" in answer
        assert all(read_until_closed(s).startswith(b"HTTP/1.1 408 ") for s in idle)  # closed after 0.5 s
    finally:
        for s in idle:
            s.close()
    assert probe(guarded.url) == probe_text


def test_cors_when_asked_for(locked):
    preflight = httpx.options(f"{locked.url}/v1/completions", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"


def test_stories260k_over_http_tells_its_published_story(stories_ckpt):
    g = Llama.build(str(stories_ckpt), max_seq_len=128, max_batch_size=2, device="cpu")
    with serve_in_thread(g, model_name="stories260K", config=ServeConfig(page=False)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert r.choices[0].text.startswith(", there was a little girl named Lily.")


GLOO_ERROR = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:29500: Connection reset"


@pytest.mark.parametrize("stream", [True, False])
def test_if_the_engine_dies_the_request_in_flight_gets_an_error_and_the_server_stops(tiny_ckpt, caplog, stream):
    """A rank that dies breaks the engine's step with gloo's error. Issue 18, item 13: its text reached clients;
    they get a plain message, and the log keeps the detail."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    with serve_in_thread(g, model_name=MODEL, config=ServeConfig(page=False), stream_interval=0) as s:
        apply, steps = g.engine._apply, []

        def breaking(results):  # the engine's thread dies mid-request
            steps.append(1)
            if len(steps) > 5:
                raise RuntimeError(GLOO_ERROR)
            apply(results)

        g.engine._apply = breaking
        body = {"model": MODEL, "prompt": "The cat", "max_tokens": 80, "temperature": 0, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            error = events[-1]["error"]
            assert not any(c["finish_reason"] for e in events[:-1] for c in e["choices"])
        else:
            r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 500
            error = r.json()["error"]
        assert error["message"] == "generation failed: a model worker stopped, and the server is going down"
        assert error["code"] == "engine_error"
        assert GLOO_ERROR in caplog.text  # the operator's log has it
        assert not s.service.ready and isinstance(s.service.failure, RuntimeError)
        deadline = time.monotonic() + 10
        while s._thread.is_alive() and time.monotonic() < deadline:  # the server goes down by itself
            time.sleep(0.05)
        assert not s._thread.is_alive()
