"""The Gradio page at `/`: its /complete and /chat functions through gradio_client, and the page itself in
headless Chromium (selenium), on one server in a thread of this process."""
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("gradio", reason="the page tests need the serve extra: pip install -e '.[serve]'")
gradio_client = pytest.importorskip("gradio_client")

from conftest import ASSETS, PROBE, ROOT, probe  # noqa: E402
from llama import Llama  # noqa: E402
from llama.pool import ModelPool, ModelSpec  # noqa: E402
from llama.serve import ServeConfig, page  # noqa: E402
from llama.serve.server import serve_in_thread  # noqa: E402

MAX_SEQ_LEN, KEY = 256, "page-key"
SECRET = "zebra quartz pelican"  # a prompt that must not reach the log


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> Llama:
    return Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu")
    with serve_in_thread(g, model_name="tiny-page") as s:
        yield s


def page_completion(ref, prompt, seed, temperature=0.6, top_p=0.9, max_tokens=255):
    """What the completion tab shows: the prompt, then its completion (the page's sampling defaults)."""
    return prompt + ref.text_completion([prompt], temperature=temperature, top_p=top_p, max_gen_len=max_tokens,
                                        seed=seed)[0]["generation"]


def test_complete_from_python_repeats_with_its_seed(server, ref):
    client = gradio_client.Client(server.url, verbose=False)
    text = client.predict("my new invention is the", 800, api_name="/complete")
    assert text == page_completion(ref, "my new invention is the", 800)
    assert client.predict("my new invention is the", 800, api_name="/complete") == text
    assert client.predict("my new invention is the", 801, api_name="/complete") != text
    # the other inputs: the model, temperature, top_p, max tokens
    assert client.predict("The cat", 3, "tiny-page", 0, 0.5, 10, api_name="/complete") == page_completion(
        ref, "The cat", 3, 0, 0.5, 10)


def test_page_users_batch_together(server, ref):
    """Gradio's queue runs the page's calls at once (no concurrency limit): they share engine steps."""
    engine = server.service.llama.engine
    prompts = [f"The dog {i}" for i in range(6)]
    expected = [page_completion(ref, p, i) for i, p in enumerate(prompts)]
    before, got = engine.stats.steps, [None] * 6

    def one(i):
        got[i] = gradio_client.Client(server.url, verbose=False).predict(prompts[i], i, api_name="/complete")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected
    assert engine.stats.steps - before < 4 * 128  # one after another would be 6 x 128 steps


def test_chat_answers_with_the_system_prompt_turn_after_turn(server, ref):
    client = gradio_client.Client(server.url, verbose=False)  # keeps the conversation, as the page does
    dialog = [{"role": "system", "content": "You are brief."}]
    for message in ("Tell me a story", "And then?"):
        answer = client.predict(message, "You are brief.", 0, 0.9, 20, api_name="/chat")
        dialog.append({"role": "user", "content": message})
        assert answer == ref.chat_completion([dialog], temperature=0, max_gen_len=20)[0]["generation"]["content"]
        dialog.append({"role": "assistant", "content": answer})


def test_chat_drops_the_oldest_exchanges_that_no_longer_fit(ref):
    _fit = page._fit
    words = "the cat sat on the mat " * 6
    dialog = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        dialog += [{"role": "user", "content": f"{i} {words}"}, {"role": "assistant", "content": words}]
    dialog.append({"role": "user", "content": "last"})
    assert len(ref.encode_dialog(dialog)) > MAX_SEQ_LEN
    prompt = _fit(ref, dialog, 40)
    assert len(prompt) + 40 <= MAX_SEQ_LEN
    # the system message and the newest whole exchanges: one more would not have fit
    start = next(k for k in range(1, len(dialog), 2) if ref.encode_dialog(dialog[:1] + dialog[k:]) == prompt)
    assert start > 1 and len(ref.encode_dialog(dialog[:1] + dialog[start - 2:])) + 40 > MAX_SEQ_LEN


def fit_by_dropping(g, dialog, max_tokens):
    """The definition of `_fit`: drop the oldest exchange until the prompt leaves max_tokens free."""
    head = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(head):]
    while len(g.encode_dialog(head + turns)) + max_tokens > g.max_seq_len and len(turns) > 1:
        turns = turns[2:]
    return g.encode_dialog(head + turns)


def conversation(n_exchanges, system=True, words=lambda i: "the cat sat " * (i % 7)):
    dialog = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(n_exchanges):
        dialog += [{"role": "user", "content": f"{i} {words(i)}"}, {"role": "assistant", "content": words(i + 3)}]
    return dialog + [{"role": "user", "content": "last"}]


@pytest.mark.parametrize("n, system, max_tokens", [(0, True, 10), (1, False, 10), (3, True, 200), (9, True, 40),
                                                   (30, False, 1), (30, True, 120), (200, True, 60)])
def test_fit_keeps_what_dropping_one_exchange_at_a_time_keeps(ref, n, system, max_tokens):
    dialog = conversation(n, system)
    assert page._fit(ref, dialog, max_tokens) == fit_by_dropping(ref, dialog, max_tokens)


def test_fitting_a_long_chat_encodes_only_its_newest_part(ref, monkeypatch):
    """Issue 18, item 2: each dropped exchange re-encoded the whole conversation (62 s at 10,000 messages)."""
    dialog = conversation(1000)
    expected = fit_by_dropping(ref, dialog[:1] + dialog[-201:], 40)
    encoded, encode = [0], ref.encode_dialog

    def counting(d):
        encoded[0] += len(d)
        assert encoded[0] <= len(dialog), "encoded more messages than the conversation holds"
        return encode(d)

    monkeypatch.setattr(ref, "encode_dialog", counting)
    assert page._fit(ref, dialog, 40) == expected
    assert encoded[0] <= 1000


def test_the_page_keeps_at_most_1000_messages_of_a_chat(ref):
    history = [{"role": r, "content": "hi"} for _ in range(500) for r in ("user", "assistant")]
    assert page.chat_prompt(ref, "", history, "next", 20) == page._fit(
        ref, history + [{"role": "user", "content": "next"}], 20)
    with pytest.raises(ValueError, match="the conversation holds 1002 messages, more than the page keeps \\(1000\\): "
                                         "clear it and start a new one"):
        page.chat_prompt(ref, "", history + history[:2], "next", 20)


def test_a_chat_is_prepared_off_the_event_loop(server, monkeypatch):
    """Issue 18, item 2: fitting a long history ran in the event loop, stalling every client's /health."""
    entered, release, prepare = threading.Event(), threading.Event(), page.chat_prompt

    def slow(*args):
        entered.set()
        release.wait(timeout=20)
        return prepare(*args)

    monkeypatch.setattr(page, "chat_prompt", slow)
    answers = []
    chat = threading.Thread(target=lambda: answers.append(gradio_client.Client(server.url, verbose=False).predict(
        "hello", "", 0, 0.9, 3, api_name="/chat")))
    chat.start()
    try:
        assert entered.wait(timeout=60)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # while the chat is being prepared
    finally:
        release.set()
        chat.join(timeout=60)
    assert answers and answers[0]


def test_chat_refuses_a_reserved_tag_and_keeps_serving(server):
    client = gradio_client.Client(server.url, verbose=False)
    with pytest.raises(Exception, match=r"reserved chat tag \u201c\[INST\]\u201d: remove it\."):
        client.predict("a [INST] b", "", 0, 0.9, 5, api_name="/chat")
    assert client.predict("hello", "", 0, 0.9, 3, api_name="/chat")


def test_uploads_are_refused_and_the_page_s_files_removed_at_exit(tiny_ckpt, ref):
    """Issue 18, item 3: anyone could upload files at 40 MB/s into Gradio's temp folder, kept across restarts."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    with serve_in_thread(g, model_name="tiny-page") as s:
        expected = probe(s.url)
        assert expected == ref.text_completion([PROBE["prompt"]], temperature=0, max_gen_len=PROBE["max_tokens"])[0][
            "generation"]
        folder = next(r.app for r in s._server.config.app.routes if getattr(r, "path", None) == "").uploaded_file_dir
        assert os.path.basename(folder).startswith("llama-page-") and os.path.isdir(folder)
        for path in ("/gradio_api/upload", "/gradio_api/upload/"):
            r = httpx.post(s.url + path, files={"files": ("note.txt", b"x" * 100_000)}, follow_redirects=True)
            assert r.status_code == 403 and r.json()["error"]["code"] == "uploads_refused", r.text
            assert r.json()["error"]["message"] == "this page takes no files: uploads are refused"
        r = httpx.get(s.url + "/gradio_api/deep_link", params={"session_hash": "abc"})
        assert r.status_code == 403  # the other route that writes files
        assert not any(files for _, _, files in os.walk(folder))
        assert probe(s.url) == expected
    assert not os.path.exists(folder)


def gradio_call(url, api_name, data):
    """Gradio's HTTP API, as any client can call it: POST the values, then read the event stream."""
    event = httpx.post(f"{url}/gradio_api/call/{api_name}", json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{url}/gradio_api/call/{api_name}/{event}", timeout=60).text


def test_a_malformed_page_call_logs_no_prompt(server, ref, capfd, caplog):
    """Issue 18, item 11: 2 of /complete's 5 values made Gradio print a traceback quoting the prompt. Values left
    out are now the page's defaults; values of the wrong kind are an error that quotes nothing in the log."""
    expected = probe(server.url)
    short = gradio_call(server.url, "complete", ["The cat", 3])
    assert short.count("event: complete") == 1 and json.dumps(page_completion(ref, "The cat", 3)) in short
    assert "event: error" in gradio_call(server.url, "complete", [])
    odd = gradio_call(server.url, "complete", [SECRET, 3, {"x": SECRET}, [SECRET], "many"])
    assert "event: error" in odd
    assert gradio_call(server.url, "complete", ["The cat", 3, "tiny-page", 0.6, 0.9, 5, 1]).count(
        "event: complete") == 1
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text and "Traceback" not in out + err
    assert probe(server.url) == expected


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                  ("POST", "/health", 405)])
def test_unknown_api_paths_are_not_the_page_s(server, method, path, status):
    """Issue 18, item 12: with the page at `/`, Gradio answered every unknown path with {"detail": "Not Found"}."""
    r = httpx.request(method, server.url + path, json={})
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


@pytest.fixture(scope="module")
def models(tiny_ckpt, tmp_path_factory):
    """Two models for the page: the tiny demo (with the demo's warning) and another with other weights."""
    from llama.commands.serve import DEMO_DESCRIPTION
    from llama.tiny import make_tiny_checkpoint

    beta = make_tiny_checkpoint(tmp_path_factory.mktemp("beta") / "beta", seed=1)
    build = {"max_seq_len": MAX_SEQ_LEN, "max_batch_size": 4, "device": "cpu"}
    specs = [ModelSpec("llama-tiny-demo", {"ckpt_dir": str(tiny_ckpt), **build}, max_seq_len=MAX_SEQ_LEN,
                       description=DEMO_DESCRIPTION),
             ModelSpec("beta", {"ckpt_dir": str(beta), **build}, max_seq_len=MAX_SEQ_LEN)]
    refs = {"llama-tiny-demo": Llama.build(str(tiny_ckpt), **build), "beta": Llama.build(str(beta), **build)}
    return specs, refs


@pytest.fixture(scope="module")
def two(models):
    with serve_in_thread(ModelPool(models[0])) as s:
        yield s


def test_complete_takes_the_model_third_as_the_tutorial_s_predict(two, models):
    refs = models[1]
    client = gradio_client.Client(two.url, verbose=False)
    for name in ("beta", "llama-tiny-demo"):
        assert client.predict("my new invention is the", 800, name, api_name="/complete") == page_completion(
            refs[name], "my new invention is the", 800)
    assert client.predict("The cat", 5, api_name="/complete") == page_completion(refs["llama-tiny-demo"], "The cat", 5)
    with pytest.raises(Exception, match="The model \u201cgamma\u201d does not exist: this server serves "
                                        "\u201cllama-tiny-demo\u201d, \u201cbeta\u201d."):
        client.predict("The cat", 5, "gamma", api_name="/complete")
    # /chat takes the model after max_tokens
    answer = client.predict("Hello", "", 0, 0.9, 12, "beta", api_name="/chat")
    assert answer == refs["beta"].chat_completion([[{"role": "user", "content": "Hello"}]], temperature=0,
                                                  max_gen_len=12)[0]["generation"]["content"]


def docs_snippet(marker):
    """The python block of docs/serving.md that holds `marker`."""
    text = (ROOT / "docs" / "serving.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b)


def test_the_documented_plain_http_call_of_the_page_works(two, models, capsys):
    """docs/serving.md's two-step call of /gradio_api/call/complete with plain `requests`, run as it is shown."""
    code = docs_snippet("/gradio_api/call/complete").replace("http://127.0.0.1:8000", two.url)
    assert '"stories15M"' in code
    code = code.replace('"stories15M"', '"beta"')
    exec(compile(code, "docs/serving.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed == page_completion(models[1]["beta"], "my new invention is the", 800)


def test_errors_read_as_sentences():
    assert page.sentence("the model 'x' does not exist: this server serves 'a', 'b'") == (
        "The model \u201cx\u201d does not exist: this server serves \u201ca\u201d, \u201cb\u201d.")
    assert page.sentence("  shorten it!  ") == "Shorten it!"
    assert page.sentence("it's fine: don't") == "It's fine: don't."  # apostrophes are not quotes


def chromium_and_driver():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("headless Chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver_path = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path, name):
    """A PNG of the window, kept in tmp_path, and in LLAMA_SCREENSHOTS (a folder, e.g. docs/) when set."""
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("LLAMA_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["LLAMA_SCREENSHOTS"]) / name)


@pytest.fixture(scope="module")
def browsed(models, tmp_path_factory):
    """The browser's two models: the demo, and stories260K (real text, for the screenshots) or, without the
    assets, beta."""
    from llama.llama2c import convert_llama2c

    specs, refs = models
    if not ((ASSETS / "stories260K.bin").is_file() and (ASSETS / "tok512.model").is_file()):
        return specs, refs, "beta"
    folder = convert_llama2c(ASSETS / "stories260K.bin", ASSETS / "tok512.model",
                             tmp_path_factory.mktemp("stories") / "stories260K")
    build = {"max_seq_len": MAX_SEQ_LEN, "max_batch_size": 4, "device": "cpu"}
    spec = ModelSpec("stories260K", {"ckpt_dir": str(folder), **build}, max_seq_len=MAX_SEQ_LEN)
    return [specs[0], spec], {**refs, "stories260K": Llama.build(str(folder), **build)}, "stories260K"


@pytest.mark.slow
def test_the_page_in_a_real_browser(browsed, browser, tmp_path, monkeypatch):
    """Headless Chromium at 1280x900: the conversation fills the window with the message box at its bottom and
    the settings in a side panel, the demo model says its text is gibberish; switched to another model, a message
    streams in, piece by piece, and the stop button ends it mid-stream (its request too); the completion tab
    streams what /complete gives, for each model."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from llama.runner import Runner
    from llama.tokenizer import Tokenizer

    specs, refs, other = browsed
    # Long, slow answers, to watch them grow and stop them: no stop token, and 20 ms a step.
    monkeypatch.setattr(Tokenizer, "stop_ids", property(lambda self: frozenset()))
    execute = Runner.execute
    monkeypatch.setattr(Runner, "execute", lambda self, plan: (time.sleep(0.02), execute(self, plan))[1])
    with serve_in_thread(ModelPool(specs)) as s:
        driver = browser
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))  # Gradio re-renders
        js = driver.execute_script
        driver.get(s.url + "/")
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"))
        # The layout: the conversation takes most of the window, the message box sits at its bottom.
        height = js("return window.innerHeight")
        rect = lambda css: js(f"return document.querySelector('{css}').getBoundingClientRect().toJSON()")  # noqa
        assert height - 80 < rect("#message")["bottom"] <= height
        assert rect("#conversation")["height"] > 0.6 * height
        side = driver.find_element(By.ID, "settings").text
        for label in ("Model", "System prompt", "Temperature", "Top p", "Max tokens", "Repetition penalty", "Seed"):
            assert label in side
        assert driver.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("type") == "number"
        assert "gibberish by design" in driver.find_element(By.ID, "notice").text

        def set_number(css, value):
            field = driver.find_element(By.CSS_SELECTOR, css)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(value), Keys.TAB)

        def choose(name):
            driver.find_element(By.CSS_SELECTOR, "#model input").click()
            wait.until(lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]")
                                       if o.text.strip().endswith(name)), None)).click()  # "✓" and a newline first

        choose(other)
        wait.until(lambda d: js("const n = document.querySelector('#notice'); return !n || n.offsetParent === null"))
        # Chat: send, watch the answer grow, stop it mid-stream.
        set_number("#max_tokens input[type=number]", 250)
        js("""window.seen = []; window.recorder = setInterval(() => {
                const bots = document.querySelectorAll('#conversation .bot');
                const text = bots.length ? bots[bots.length - 1].innerText : '';
                if (window.seen[window.seen.length - 1] !== text) window.seen.push(text); }, 5);""")
        engine = s.service.pool.loaded()[other].engine
        before = engine.stats.generated_tokens
        box.send_keys("Tell me a story about a dog", Keys.ENTER)
        button = "const b = document.querySelector('#message button'); return b && b.className"
        wait.until(lambda d: "stop" in (js(button) or ""))  # the stop button, while the answer streams
        wait.until(lambda d: len(js("return window.seen")[-1]) > 300)  # a screenful, for the screenshot
        screenshot(driver, tmp_path, "serve_page_chat.png")
        js("document.querySelector('#message button').click()")
        wait.until(lambda d: "submit" in (js(button) or ""))
        wait.until(lambda d: engine.pending() == (0, 0))  # the stop reached the engine: its row is free
        seen = [v for v in js("clearInterval(window.recorder); return window.seen;") if v.strip()]
        assert len(seen) >= 4  # it grew piece by piece
        assert engine.stats.generated_tokens - before < 250  # and ended before its 250 tokens
        # Completion: the same text /complete gives, streamed into the box, for each model.
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Completion").click()
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.clear()
        prompt.send_keys("The little dog")
        set_number("#seed input", 7)
        set_number("#max_tokens input[type=number]", 60)
        completion = "return document.querySelector('#completion textarea').value"
        for name in (other, "llama-tiny-demo"):
            choose(name)
            driver.find_element(By.ID, "generate").click()
            expected = page_completion(refs[name], "The little dog", 7, max_tokens=60)
            wait.until(lambda d: js(completion) == expected)
            wait.until(lambda d: d.find_element(By.ID, "generate").is_displayed())
            if name == other:
                screenshot(driver, tmp_path, "serve_page_completion.png")


def test_with_an_api_key_the_page_asks_for_it(tiny_ckpt, ref):
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    with serve_in_thread(g, model_name="tiny-page", config=ServeConfig(api_key=KEY)) as s:
        for method, path in (("GET", "/config"), ("POST", "/gradio_api/call/complete"),
                             ("POST", "/gradio_api/queue/join")):  # the page's config and its calls
            r = httpx.request(method, s.url + path, json={"data": ["The cat", 3], "fn_index": 0})
            assert r.status_code == 401 and "Not authenticated" in r.text
        with pytest.raises(ValueError, match="Could not login"):  # gradio_client's words for a refused login
            gradio_client.Client(s.url, auth=("anyone", "wrong"), verbose=False)
        client = gradio_client.Client(s.url, auth=("anyone", KEY), verbose=False)
        assert client.predict("The cat", 3, api_name="/complete") == page_completion(ref, "The cat", 3)


def test_wrong_page_logins_are_throttled(tiny_ckpt):
    """Issue 18, item 15: wrong logins were never throttled. After 5 in a row a client waits 1 s, then 2 s, ..."""
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")
    with serve_in_thread(g, model_name="tiny-page", config=ServeConfig(api_key=KEY)) as s, \
            httpx.Client(timeout=30) as http:
        def login(password):
            return http.post(s.url + "/login", data={"username": "me", "password": password})

        answers = [login(f"guess{i}") for i in range(20)]
        assert [r.status_code for r in answers[:5]] == [400] * 5 and {r.status_code for r in answers[5:]} == {429}
        assert answers[-1].headers["retry-after"] == "1" and "too many wrong API keys or logins" in answers[-1].text
        assert login(KEY).status_code == 429
        key = {"Authorization": f"Bearer {KEY}"}
        assert http.get(s.url + "/v1/models", headers=key).status_code == 429  # keys and logins count together
        time.sleep(1.1)
        assert login(KEY).status_code == 200 and login("guess").status_code == 400


@pytest.mark.slow
def test_the_documented_bash_call_of_the_page_works(two, models):
    """docs/serving.md's two-step call of /gradio_api/call/complete with curl, as bash runs it."""
    import subprocess

    from conftest import require_slow

    text = (ROOT / "docs" / "serving.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "/gradio_api/call/" in b)
    require_slow("starts bash")
    script = block.replace("http://127.0.0.1:8000", two.url).replace('"stories15M"', '"beta"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = [json.loads(line[len("data:"):]) for line in out.stdout.splitlines() if line.startswith("data:")]
    assert "event: complete" in out.stdout and data[-1] == [page_completion(models[1]["beta"],
                                                                            "my new invention is the", 800)]
