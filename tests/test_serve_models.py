"""Several models in one server (llama.pool, llama.serve): the `openai` client choosing among them, each model's
answers equal to the same model served alone, concurrent traffic to both, loading on first use within a budget
(the least recently used idle model unloaded, a busy one never), a load that stalls no other model's stream,
and the command line's models (--model, --models, --lora) refused at start when they clash."""
import gc
import threading
import time
import weakref

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra: pip install -e '.[serve]'")

from conftest import run_main  # noqa: E402
from llama import Llama  # noqa: E402
from llama import pool as pool_module  # noqa: E402
from llama.commands import serve  # noqa: E402
from llama.pool import ModelPool, ModelSpec  # noqa: E402
from llama.serve import ServeConfig  # noqa: E402
from llama.serve.server import serve_in_thread  # noqa: E402
from llama.tiny import make_tiny_checkpoint  # noqa: E402

PROMPTS = ["The cat", "A dog ran to the park", "Once", "The happy bird sang", "Two fish", "One little fish"]
LENS = {"alpha": 128, "beta": 96}


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt, tmp_path_factory):
    """Two different models: the tiny checkpoint and one with other random weights (and its own tokenizer)."""
    return {"alpha": tiny_ckpt, "beta": make_tiny_checkpoint(tmp_path_factory.mktemp("beta") / "beta", seed=1)}


def spec(name, ckpts, estimate=0):
    build = {"ckpt_dir": str(ckpts[name]), "max_seq_len": LENS[name], "max_batch_size": 4, "device": "cpu"}
    return ModelSpec(name, build, max_seq_len=LENS[name], estimate=estimate)


@pytest.fixture(scope="module")
def refs(ckpts):
    """Each model alone, serving nothing: what every answer over HTTP must equal."""
    return {name: Llama.build(str(ckpts[name]), max_seq_len=LENS[name], max_batch_size=4, device="cpu")
            for name in ckpts}


def greedy(g, prompt, n=12):
    return g.text_completion([prompt], temperature=0, max_gen_len=n)[0]["generation"]


def chat_greedy(g, content, n=12):
    return g.chat_completion([[{"role": "user", "content": content}]], temperature=0,
                             max_gen_len=n)[0]["generation"]["content"]


@pytest.fixture(scope="module")
def two(ckpts):
    """Both models loaded at start (no budget), each on its own engine."""
    with serve_in_thread(ModelPool([spec("alpha", ckpts), spec("beta", ckpts)]),
                         config=ServeConfig(page=False)) as s:
        yield s


@pytest.fixture(scope="module")
def client(two):
    return openai.OpenAI(base_url=two.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_models_are_listed_with_their_context_and_a_request_chooses_one(two, client, refs):
    models = client.models.list()
    assert [m.id for m in models] == ["alpha", "beta"]
    listed = httpx.get(two.url + "/v1/models").json()["data"]
    assert [(m["max_model_len"], m["loaded"]) for m in listed] == [(128, True), (96, True)]
    assert client.models.retrieve("beta").id == "beta"
    for name in ("alpha", "beta"):
        r = client.completions.create(model=name, prompt="The cat", max_tokens=12, temperature=0)
        assert r.model == name and r.choices[0].text == greedy(refs[name], "The cat")
        c = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=12, temperature=0)
        assert c.model == name and c.choices[0].message.content == chat_greedy(refs[name], "Hello")
    assert greedy(refs["alpha"], "The cat") != greedy(refs["beta"], "The cat")  # they are different models
    # no model named: the first
    assert httpx.post(two.url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 12, "temperature": 0}
                      ).json()["choices"][0]["text"] == greedy(refs["alpha"], "The cat")
    health = httpx.get(two.url + "/health").json()
    assert health["status"] == "ok" and health["loaded"] == ["alpha", "beta"]
    assert {n: m["state"] for n, m in health["models"].items()} == {"alpha": "loaded", "beta": "loaded"}
    # each model's own tokenizer and context
    assert httpx.post(two.url + "/tokenize", json={"model": "beta", "prompt": "The cat"}).json() == {
        "count": len(refs["beta"].tokenizer.encode("The cat", bos=True, eos=False)), "max_model_len": 96,
        "tokens": refs["beta"].tokenizer.encode("The cat", bos=True, eos=False)}


def test_an_unknown_model_is_a_404_naming_the_ones_served(two, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gamma", prompt="The cat", max_tokens=4)
    error = e.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == "the model 'gamma' does not exist: this server serves 'alpha', 'beta'"
    r = httpx.get(two.url + "/v1/models/gamma")
    assert r.status_code == 404 and "'alpha', 'beta'" in r.json()["error"]["message"]
    assert client.completions.create(model="beta", prompt="Once", max_tokens=2).choices  # and it serves on


def test_concurrent_traffic_to_both_models_loses_nothing(two, client, refs):
    """24 requests at once, streamed and whole, alternating models: each answer is its model's alone, and
    neither engine ever ran a step for the other's requests."""
    engines = {n: two.service.pool.loaded()[n].engine for n in ("alpha", "beta")}
    before = {n: e.stats.requests_submitted for n, e in engines.items()}
    jobs = [(["alpha", "beta"][i % 2], PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(24)]
    got = [None] * len(jobs)

    def ask(i):
        name, prompt, stream = jobs[i]
        if stream:
            chunks = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0, stream=True)
            got[i] = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            got[i] = client.completions.create(model=name, prompt=prompt, max_tokens=16,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == [greedy(refs[name], prompt, 16) for name, prompt, _ in jobs]
    assert {n: e.stats.requests_submitted - before[n] for n, e in engines.items()} == {"alpha": 12, "beta": 12}


def test_metrics_have_a_series_per_model(two, client):
    client.completions.create(model="beta", prompt="Once", max_tokens=2)
    text = httpx.get(two.url + "/metrics").text
    assert 'llama_model_loaded{model="alpha"} 1.0' in text and 'llama_model_loaded{model="beta"} 1.0' in text
    assert 'llama_slots{model="alpha"} 4.0' in text and 'llama_slots{model="beta"} 4.0' in text
    assert 'llama_time_to_first_token_seconds_count{model="beta"}' in text


def states(server):
    return {n: m["state"] for n, m in httpx.get(server.url + "/health").json()["models"].items()}


def test_with_one_model_loaded_at_most_the_least_recently_used_idle_one_unloads(ckpts, refs):
    pool = ModelPool([spec("alpha", ckpts), spec("beta", ckpts)], max_loaded=1)
    with serve_in_thread(pool, config=ServeConfig(page=False)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert httpx.get(s.url + "/health").json()["status"] == "ok"  # nothing needs loading to be ready
        assert states(s) == {"alpha": "unloaded", "beta": "unloaded"}
        assert [m["loaded"] for m in httpx.get(s.url + "/v1/models").json()["data"]] == [False, False]
        order, gone = ("alpha", "beta", "alpha", "alpha", "beta"), []
        gc.disable()  # an unloaded model's memory must go with it, not with some later collection (the pool runs none)
        try:
            for i, name in enumerate(order):
                if i and order[i - 1] != name:  # this request unloads the other model
                    gone.append(weakref.ref(pool.loaded()[order[i - 1]].model))
                r = client.completions.create(model=name, prompt="The cat", max_tokens=12, temperature=0)
                assert r.choices[0].text == greedy(refs[name], "The cat")
                assert states(s) == {name: "loaded", ("beta" if name == "alpha" else "alpha"): "unloaded"}
            assert len(gone) == 3 and all(ref() is None for ref in gone)
        finally:
            gc.enable()
        status = pool.status()
        assert (status["alpha"]["loads"], status["beta"]["loads"]) == (2, 2)
        assert status["alpha"]["load_s"] > 0 and status["beta"]["load_s"] > 0
        assert 'llama_model_loads_total{model="alpha"} 2.0' in httpx.get(s.url + "/metrics").text


def test_a_busy_model_is_never_unloaded_the_load_waits_for_it_to_turn_idle(ckpts, refs, monkeypatch):
    from llama.runner import Runner

    execute = Runner.execute
    monkeypatch.setattr(Runner, "execute", lambda self, plan: (time.sleep(0.02), execute(self, plan))[1])  # 2 s
    pool = ModelPool([spec("alpha", ckpts), spec("beta", ckpts)], max_loaded=1)
    with serve_in_thread(pool, config=ServeConfig(page=False)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(model="alpha", prompt="Once", max_tokens=100, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        first = next(iter(stream))  # alpha is loaded and busy
        answer = []
        beta = threading.Thread(target=lambda: answer.append(client.completions.create(
            model="beta", prompt="The cat", max_tokens=12, temperature=0).choices[0].text))
        beta.start()
        time.sleep(0.5)
        assert states(s)["beta"] == "unloaded" and beta.is_alive()  # waiting for alpha to finish
        chunks = [first] + list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == greedy(refs["alpha"], "Once", 100)  # whole: not cut short by beta's wait
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        beta.join(timeout=60)
        assert answer == [greedy(refs["beta"], "The cat")]
        assert states(s) == {"alpha": "unloaded", "beta": "loaded"}


def test_a_model_loading_stalls_no_other_model_s_stream(ckpts, refs, monkeypatch):
    """beta's load is held until alpha's whole stream has arrived: the stream never waits for the load, and the
    request for beta waits for it, then gets beta's answer."""
    pool = ModelPool([spec("alpha", ckpts), spec("beta", ckpts)], max_loaded=2)
    loading, release, build = threading.Event(), threading.Event(), pool_module._build

    def held(spec):
        if spec.name == "beta":
            loading.set()
            assert release.wait(timeout=60)
        return build(spec)

    monkeypatch.setattr(pool_module, "_build", held)
    with serve_in_thread(pool, config=ServeConfig(page=False)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.completions.create(model="alpha", prompt="The cat", max_tokens=2).choices  # alpha loads
        answer = []
        beta = threading.Thread(target=lambda: answer.append(client.completions.create(
            model="beta", prompt="The cat", max_tokens=12, temperature=0).choices[0].text))
        beta.start()
        assert loading.wait(timeout=30)
        stream = client.completions.create(model="alpha", prompt="Once", max_tokens=60, temperature=0, stream=True)
        text = "".join(c.choices[0].text for c in stream if c.choices)
        assert text == greedy(refs["alpha"], "Once", 60)
        assert states(s)["beta"] == "loading" and not answer  # all of alpha's stream came during beta's load
        release.set()
        beta.join(timeout=60)
        assert answer == [greedy(refs["beta"], "The cat")]


def test_a_load_that_fails_is_a_500_and_the_other_models_serve_on(ckpts, refs, tmp_path):
    broken = ModelSpec("broken", {"ckpt_dir": str(tmp_path / "nothing"), "device": "cpu"}, max_seq_len=64)
    pool = ModelPool([spec("alpha", ckpts), broken], max_loaded=2)
    with serve_in_thread(pool, config=ServeConfig(page=False)) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "broken", "prompt": "The cat", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        assert "the model 'broken' could not be loaded (FileNotFoundError: checkpoint folder" in \
            r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": "alpha", "prompt": "The cat", "max_tokens": 12,
                                                         "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"] == greedy(refs["alpha"], "The cat")
        assert states(s) == {"alpha": "loaded", "broken": "unloaded"}


def test_a_memory_budget_unloads_to_make_room_and_refuses_one_too_small(ckpts, refs):
    from llama.loading import estimate_bytes

    sizes = {n: estimate_bytes(ckpts[n], LENS[n], 4) for n in ckpts}
    with pytest.raises(ValueError, match=r"the memory budget of .* is too small for model 'alpha' alone, which needs "
                                         r"about .* \(weights and KV cache\): raise --memory_gb"):
        ModelPool([spec("alpha", ckpts, estimate=sizes["alpha"])], memory_bytes=sizes["alpha"] - 1)
    both = ModelPool([spec("alpha", ckpts, estimate=sizes["alpha"]), spec("beta", ckpts, estimate=sizes["beta"])],
                     memory_bytes=int(max(sizes.values()) * 1.5))  # room for one at a time
    with serve_in_thread(both, config=ServeConfig(page=False)) as s:
        for name in ("alpha", "beta"):
            r = httpx.post(s.url + "/v1/completions", json={"model": name, "prompt": "Once", "max_tokens": 8,
                                                             "temperature": 0}, timeout=60)
            assert r.json()["choices"][0]["text"] == greedy(refs[name], "Once", 8)
        assert states(s) == {"alpha": "unloaded", "beta": "loaded"}
        assert both.status()["beta"]["bytes"] == pytest.approx(sizes["beta"], rel=0.05)  # measured once loaded


def test_two_models_with_one_name_are_refused():
    with pytest.raises(ValueError, match="two models are named 'a': give each model a name of its own"):
        ModelPool([ModelSpec("a", {}), ModelSpec("a", {})])
    with pytest.raises(ValueError, match="must be 1 to 256 printable characters without ':'"):
        ModelPool([ModelSpec("base:x", {})])


# The command line.

def test_llama_serve_takes_models_from_flags_and_a_models_file(served, ckpts, tmp_path):
    status, _, err = run_main(serve.main, "--model", f"a={ckpts['alpha']}", "--model", f"b={ckpts['beta']}",
                              "--port", "0", "--nopage", "--max_loaded", "1", "--max_seq_len", "64")
    assert status == 0, err
    pool = served["service"].pool
    assert pool.names == ["a", "b"] and pool.max_loaded == 1
    assert [pool.spec(n).build["ckpt_dir"] for n in "ab"] == [str(ckpts["alpha"]), str(ckpts["beta"])]
    assert [pool.spec(n).max_seq_len for n in "ab"] == [64, 64]
    (tmp_path / "beta").symlink_to(ckpts["beta"])
    (tmp_path / "models.toml").write_text(f'''
[models.first]
ckpt_dir = "{ckpts['alpha']}"
max_seq_len = 48
quantize = "int8"

[models.second]
ckpt_dir = "beta"        # the file's folder's
chat_format = "alpaca"
''')
    status, _, err = run_main(serve.main, "--models", tmp_path / "models.toml", "--port", "0", "--nopage",
                              "--max_batch_size", "3")
    assert status == 0, err
    pool = served["service"].pool
    first, second = pool.spec("first").build, pool.spec("second").build
    assert (first["max_seq_len"], first["quantize"], first["max_batch_size"]) == (48, "int8", 3)
    assert (second["ckpt_dir"], second["chat_format"], second["quantize"]) == (str(tmp_path / "beta"), "alpaca", None)
    assert pool.max_loaded is None and served["service"].default == "first"


@pytest.mark.parametrize("args, message", [
    (["--model", "a=A", "--model", "a=B"], "two models are named 'a': give each model a name of its own"),
    (["--model", "noequals"], "--model='noequals' must be NAME=DIR"),
    (["--model", "a=A", "--ckpt_dir", "B"], "--ckpt_dir serves one model: with --model or --models, name it there"),
    (["--model", "a=A", "--model_name", "x"], "--model_name names the --ckpt_dir model"),
    (["--model", "a=A", "--model", "b=B", "--lora", "L"], "--lora=DIR merges one adapter into the one model served"),
    (["--model", "a=A", "--model", "b=B", "--lora", "x=L"], "name the adapter's base: --lora BASE:x=L"),
    (["--model", "a=A", "--lora", "c:x=L"], "--lora='c:x=L' names model 'c', which is not served"),
    (["--model", "a=A", "--lora", "a=L"], "two models are named 'a'"),
    (["--max_loaded", "0"], "--max_loaded=0 must be a positive integer"),
    (["--memory_gb", "-1"], "--memory_gb=-1 must be a positive number of GiB"),
    (["--models", "/nonexistent.toml"], "models file '/nonexistent.toml' does not exist"),
])
def test_bad_models_are_refused_before_anything_loads(args, message, served, monkeypatch):
    monkeypatch.setattr(Llama, "build", lambda *a, **k: pytest.fail("loaded a model"))
    status, _, err = run_main(serve.main, *args, "--port", "0", "--nopage")
    assert status == 1 and message in err, err
    assert "service" not in served


@pytest.mark.parametrize("text, message", [
    ("[models.a]\nckpt_dir = 'A'\nquantise = 'int8'\n", "models.a.quantise is not an option of a model; a model "
                                                        "takes those of the flags --ckpt_dir, --tokenizer_path, "
                                                        "--dtype, --quantize"),
    ("[models.a]\nmax_seq_len = 64\n", "models.a.ckpt_dir is missing: the model's checkpoint folder"),
    ("[models.a]\nckpt_dir = 'A'\nmax_seq_len = '64'\n", "models.a.max_seq_len must be a TOML integer, not '64'"),
    ("port = 1\n[models.a]\nckpt_dir = 'A'\n", "it must hold a [models.NAME] table per model, and nothing else "
                                               "(found port)"),
    ("[models.a\n", "not valid TOML"),
])
def test_a_bad_models_file_is_refused_by_name(text, message, served, tmp_path):
    (tmp_path / "m.toml").write_text(text)
    status, _, err = run_main(serve.main, "--models", tmp_path / "m.toml", "--port", "0", "--nopage")
    assert status == 1 and message in err, err


def test_a_memory_budget_too_small_for_the_largest_model_is_refused_at_start(served, ckpts):
    status, _, err = run_main(serve.main, "--model", f"a={ckpts['alpha']}", "--model", f"b={ckpts['beta']}",
                              "--memory_gb", "0.0001", "--port", "0", "--nopage")
    assert status == 1 and "the memory budget of 0.1 MiB is too small for model" in err, err
