"""LoRA adapters chosen per request over HTTP: the `openai` client naming an adapter (NAME or BASE:NAME) gets the
merged model's greedy answer while base requests beside it stay the base's; vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter under traffic, behind the API key, 400 for what the library refuses (the server serving
on), 404 for names not served; --lora NAME=DIR at the command line, refused at start when the adapter is."""
import json
import shutil
import threading
import time
import warnings

import httpx
import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra: pip install -e '.[serve]'")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import probe, run_main  # noqa: E402
from llama import Llama  # noqa: E402
from llama.commands import serve  # noqa: E402
from llama.hf import write_hf  # noqa: E402
from llama.loading import open_checkpoint  # noqa: E402
from llama.pool import ModelPool, ModelSpec  # noqa: E402
from llama.serve import ServeConfig  # noqa: E402
from llama.serve.server import serve_in_thread  # noqa: E402
from llama.tiny import make_tiny_checkpoint  # noqa: E402

if not hasattr(Llama, "load_adapter"):
    pytest.skip("unmerged adapters need Llama.load_adapter (the lora-mix branch)", allow_module_level=True)

MAX_SEQ_LEN, KEY = 96, "adapter-key"
PROMPTS = ["The cat", "A dog ran to the park", "Once", "Two fish"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(hf_base, path, seed, r=4, **config):
    """A PEFT LoRA adapter of random (untrained) factors, saved by peft itself."""
    base = transformers.LlamaForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(seed)
        lora = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJECTIONS, init_lora_weights=False, **config)
        model = peft.get_peft_model(base, lora)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    hf_base = write_hf(open_checkpoint(tiny_ckpt), root / "hf_base")
    sql, poems = peft_adapter(hf_base, root / "sql", 1), peft_adapter(hf_base, root / "poems", 2)
    dora = root / "dora"
    shutil.copytree(sql, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    other = make_tiny_checkpoint(root / "wide", params={"dim": 96, "n_layers": 2, "n_heads": 4, "multiple_of": 32})
    wide = peft_adapter(write_hf(open_checkpoint(other), root / "wide_hf"), root / "wide_lora", 3)
    return {"sql": sql, "poems": poems, "dora": dora, "wide": wide}


def merged(tiny_ckpt, folder):
    """The reference of an adapter: the base with it merged as it loads (llama.lora, checked against peft)."""
    return Llama.build(str(tiny_ckpt), lora=None if folder is None else str(folder), max_seq_len=MAX_SEQ_LEN,
                       max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def refs(tiny_ckpt, folders):
    return {name: merged(tiny_ckpt, folders.get(name)) for name in ("base", "sql", "poems")}


def greedy(g, prompt, n=12):
    return g.text_completion([prompt], temperature=0, max_gen_len=n)[0]["generation"]


@pytest.fixture(scope="module")
def server(tiny_ckpt, folders):
    spec = ModelSpec("tiny", {"ckpt_dir": str(tiny_ckpt), "max_seq_len": MAX_SEQ_LEN, "max_batch_size": 4,
                              "device": "cpu"}, adapters={"sql": str(folders["sql"])}, max_seq_len=MAX_SEQ_LEN)
    with serve_in_thread(ModelPool([spec]), config=ServeConfig(page=False, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def admin(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/{path}", json=body, headers=headers, timeout=60)


def test_a_request_for_an_adapter_gets_the_merged_model_s_answer(client, refs):
    assert [(m.id, m.model_dump().get("parent")) for m in client.models.list()] == [("tiny", None), ("sql", "tiny")]
    for model, ref in (("sql", "sql"), ("tiny:sql", "sql"), ("tiny", "base")):
        r = client.completions.create(model=model, prompt="The cat", max_tokens=12, temperature=0)
        assert r.model == model and r.choices[0].text == greedy(refs[ref], "The cat"), model
    assert greedy(refs["sql"], "The cat") != greedy(refs["base"], "The cat")  # the adapter changes the answer


def test_adapter_and_base_requests_share_the_batch_and_keep_their_answers(server, client, refs, monkeypatch):
    from llama.runner import Runner

    execute = Runner.execute  # 5 ms a step: the requests, sent at once, overlap
    monkeypatch.setattr(Runner, "execute", lambda self, plan: (time.sleep(0.005), execute(self, plan))[1])
    engine = server.service.pool.loaded()["tiny"].engine
    steps = engine.stats.steps
    jobs = [("sql" if i % 2 else "tiny", PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    got = [None] * len(jobs)

    def ask(i):
        got[i] = client.completions.create(model=jobs[i][0], prompt=jobs[i][1], max_tokens=16,
                                           temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == [greedy(refs["sql" if m == "sql" else "base"], p, 16) for m, p in jobs]
    assert engine.stats.steps - steps < 8 * 16 / 2  # one engine: the rows ran together, not one after another


def test_adapters_load_and_unload_at_run_time_under_traffic(server, client, folders, refs):
    stop, answers = threading.Event(), []

    def traffic():  # base and sql requests all along
        while not stop.is_set():
            for model, ref in (("tiny", "base"), ("sql", "sql")):
                text = client.completions.create(model=model, prompt="Once", max_tokens=8, temperature=0).choices[0].text
                answers.append(text == greedy(refs[ref], "Once", 8))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        r = admin(server, "load_lora_adapter", {"lora_name": "poems", "lora_path": str(folders["poems"])})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'poems' added successfully."
        assert client.completions.create(model="poems", prompt="The cat", max_tokens=12,
                                         temperature=0).choices[0].text == greedy(refs["poems"], "The cat")
        assert "poems" in [m.id for m in client.models.list()]
        r = admin(server, "load_lora_adapter", {"lora_name": "poems", "lora_path": str(folders["poems"])})
        assert r.status_code == 400 and "has already been loaded" in r.json()["error"]["message"]
        r = admin(server, "unload_lora_adapter", {"lora_name": "poems"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'poems' removed successfully."
        with pytest.raises(openai.NotFoundError, match="this server serves 'tiny'; adapters 'sql' \\(on 'tiny'\\)"):
            client.completions.create(model="poems", prompt="The cat", max_tokens=4)
        r = admin(server, "unload_lora_adapter", {"lora_name": "poems"})
        assert r.status_code == 404 and r.json()["error"]["message"] == (
            "the adapter 'poems' is not loaded: the adapters served are 'sql'")
    finally:
        stop.set()
        worker.join(timeout=120)
    assert answers and all(answers)  # nothing that ran beside the loads changed


@pytest.mark.parametrize("name, body, status, words", [
    ("refused option", {"lora_name": "d", "lora_path": "dora"}, 400, "use_dora=True is not supported"),
    ("another base's shapes", {"lora_name": "w", "lora_path": "wide"}, 400, "has shape"),
    ("no such folder", {"lora_name": "x", "lora_path": "/nonexistent/adapter"}, 400, "does not exist"),
    ("a model's name", {"lora_name": "tiny", "lora_path": "sql"}, 400, "must differ from every model's name"),
    ("no name", {"lora_path": "sql"}, 400, "lora_name must be a non-empty string"),
    ("unknown base", {"lora_name": "other:x", "lora_path": "sql"}, 404, "the model 'other' does not exist"),
])
def test_a_bad_adapter_is_refused_and_the_server_serves_on(server, folders, name, body, status, words):
    body = {k: str(folders.get(v, v)) if k == "lora_path" else v for k, v in body.items()}
    expected = probe(server.url, {"Authorization": f"Bearer {KEY}"})
    r = admin(server, "load_lora_adapter", body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert probe(server.url, {"Authorization": f"Bearer {KEY}"}) == expected
    assert [m["id"] for m in httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                                       ).json()["data"]] == ["tiny", "sql"]


def test_the_admin_routes_need_the_api_key(server, folders):
    for path, body in (("load_lora_adapter", {"lora_name": "p", "lora_path": str(folders["poems"])}),
                       ("unload_lora_adapter", {"lora_name": "sql"})):
        assert admin(server, path, body, key=None).status_code == 401
        assert admin(server, path, body, key="wrong").status_code == 401
    assert "sql" in [m["id"] for m in httpx.get(server.url + "/v1/models",
                                                headers={"Authorization": f"Bearer {KEY}"}).json()["data"]]


def test_an_adapter_on_an_unloaded_base_loads_the_base(tiny_ckpt, folders, refs):
    spec = ModelSpec("tiny", {"ckpt_dir": str(tiny_ckpt), "max_seq_len": MAX_SEQ_LEN, "max_batch_size": 4,
                              "device": "cpu"}, max_seq_len=MAX_SEQ_LEN)
    pool = ModelPool([spec], max_loaded=1)
    with serve_in_thread(pool, config=ServeConfig(page=False)) as s:
        assert pool.status()["tiny"]["state"] == "unloaded"
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(folders["sql"])},
                       timeout=60)
        assert r.status_code == 200 and pool.status()["tiny"]["state"] == "loaded"
        r = httpx.post(s.url + "/v1/completions", json={"model": "sql", "prompt": "The cat", "max_tokens": 12,
                                                         "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"] == greedy(refs["sql"], "The cat")


def test_llama_serve_takes_adapters_by_name_and_refuses_a_bad_one_at_start(served, tiny_ckpt, folders):
    status, _, err = run_main(serve.main, "--ckpt_dir", tiny_ckpt, "--lora", f"sql={folders['sql']}", "--lora",
                              f"tiny1:poems={folders['poems']}", "--port", "0", "--nopage")
    assert status == 0, err
    service = served.pop("service")
    assert service.adapters() == {"sql": ("tiny1", str(folders["sql"])), "poems": ("tiny1", str(folders["poems"]))}
    status, _, err = run_main(serve.main, "--ckpt_dir", tiny_ckpt, "--lora", f"d={folders['dora']}", "--port", "0",
                              "--nopage")
    assert status == 1 and "use_dora=True is not supported" in err and "service" not in served
    status, _, err = run_main(serve.main, "--ckpt_dir", tiny_ckpt, "--lora", f"w={folders['wide']}", "--port", "0",
                              "--nopage")
    assert status == 1 and "has shape" in err
