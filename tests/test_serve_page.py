"""The Gradio page at `/`: its /complete and /chat functions through gradio_client, and the page itself in
headless Chromium (selenium), on one server in a thread of this process."""
import shutil
import threading

import httpx
import pytest

pytest.importorskip("gradio", reason="the page tests need the serve extra: pip install -e '.[serve]'")
gradio_client = pytest.importorskip("gradio_client")

from llama import Llama  # noqa: E402
from llama.serve import ServeConfig  # noqa: E402
from llama.serve.server import serve_in_thread  # noqa: E402

MAX_SEQ_LEN, KEY = 256, "page-key"


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> Llama:
    return Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), max_seq_len=MAX_SEQ_LEN, max_batch_size=4, device="cpu")
    with serve_in_thread(g, model_name="tiny-page") as s:
        yield s


def page_completion(ref, prompt, seed, temperature=0.6, top_p=0.9, max_tokens=128):
    """What the completion tab shows: the prompt, then its completion (the page's sampling defaults)."""
    return prompt + ref.text_completion([prompt], temperature=temperature, top_p=top_p, max_gen_len=max_tokens,
                                        seed=seed)[0]["generation"]


def test_complete_from_python_repeats_with_its_seed(server, ref):
    client = gradio_client.Client(server.url, verbose=False)
    text = client.predict("my new invention is the", 800, api_name="/complete")
    assert text == page_completion(ref, "my new invention is the", 800)
    assert client.predict("my new invention is the", 800, api_name="/complete") == text
    assert client.predict("my new invention is the", 801, api_name="/complete") != text
    # the other inputs: temperature, top_p, max tokens
    assert client.predict("The cat", 3, 0, 0.5, 10, api_name="/complete") == page_completion(ref, "The cat", 3, 0,
                                                                                           0.5, 10)


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
    from llama.serve.page import _fit

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


def test_chat_refuses_a_reserved_tag_and_keeps_serving(server):
    client = gradio_client.Client(server.url, verbose=False)
    with pytest.raises(Exception, match=r"reserved chat tag '\[INST\]'"):
        client.predict("a [INST] b", "", 0, 0.9, 5, api_name="/chat")
    assert client.predict("hello", "", 0, 0.9, 3, api_name="/chat")


def chromium_and_driver():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("headless Chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.mark.slow
def test_the_page_streams_a_completion_in_a_real_browser(server, ref, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.clear()
        prompt.send_keys("The little dog")
        # Record every value the output box takes, from inside the page, as the stream fills it.
        driver.execute_script("""
            const box = document.querySelector('#completion textarea');
            window.seen = [];
            window.recorder = setInterval(() => {
                if (window.seen[window.seen.length - 1] !== box.value) window.seen.push(box.value);
            }, 2);""")
        driver.find_element(By.ID, "generate").click()
        expected = page_completion(ref, "The little dog", 1)
        wait.until(lambda d: d.execute_script("return document.querySelector('#completion textarea').value")
                   == expected)
        seen = [v for v in driver.execute_script("clearInterval(window.recorder); return window.seen;") if v]
        assert seen[-1] == expected
        assert len(seen) >= 3 and all(expected.startswith(v) for v in seen), seen  # it grew, piece by piece
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        driver.quit()


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
