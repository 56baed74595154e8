"""The API as real clients use it, through the official `openai` client: sampling controls equal to the
library's, top_logprobs and token bytes, token-id prompts, structured output checked with `jsonschema`,
Llama 3.1 tool calls (streamed and not), /tokenize, every new field's bad input a 400 naming it, and
lm-evaluation-harness's completions backend against its Hugging Face backend."""
import json

import httpx
import pytest
import torch
import torch.nn.functional as F

openai = pytest.importorskip("openai", reason="the serve tests need the serve extra: pip install -e '.[serve]'")
jsonschema = pytest.importorskip("jsonschema")

from conftest import logits  # noqa: E402
from llama import Llama, ModelArgs  # noqa: E402
from llama.checkpoint import write_checkpoint  # noqa: E402
from llama.sampling import Constraint  # noqa: E402
from llama.serve import ServeConfig  # noqa: E402
from llama.serve.server import serve_in_thread  # noqa: E402
from llama.tiny import TINY_PARAMS, random_state_dict  # noqa: E402
from test_tokenizer import write_tiny_tiktoken  # noqa: E402

MODEL = "tiny"
PROMPT = "The cat sat on the mat and the dog"


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> Llama:
    return Llama.build(str(tiny_ckpt), max_seq_len=128, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), max_seq_len=128, max_batch_size=4, device="cpu")
    with serve_in_thread(g, model_name=MODEL, config=ServeConfig(page=False)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    return e.value.body


@pytest.mark.parametrize("extra", [dict(repetition_penalty=1.3), dict(presence_penalty=1.5, frequency_penalty=0.7),
                                   dict(min_p=0.2, temperature=1.0, seed=3), dict(top_k=3, temperature=1.0, seed=4),
                                   dict(logit_bias={"77": 6.0, "5": -100})])
def test_sampling_controls_give_the_librarys_text(client, ref, extra):
    """Penalties as OpenAI fields, repetition_penalty / min_p / top_k as vLLM's extra fields."""
    extra = dict(extra)
    temperature, seed = extra.pop("temperature", 0.0), extra.pop("seed", None)
    openai_fields = {k: extra.pop(k) for k in ("presence_penalty", "frequency_penalty", "logit_bias") if k in extra}
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=temperature, seed=seed,
                                  extra_body=extra, **openai_fields)
    lib_bias = {int(k): v for k, v in openai_fields.pop("logit_bias", {}).items()}
    expected = ref.text_completion([PROMPT], temperature=temperature, top_p=1.0, max_gen_len=24, seed=seed,
                                   **({"logit_bias": lib_bias} if lib_bias else {}), **openai_fields,
                                   **extra)[0]["generation"]
    assert r.choices[0].text == expected


def test_an_unknown_sampling_field_is_refused_by_name(client):
    for field in ("typical_p", "ignore_eos", "mirostat", "guided_choice"):
        body = bad_request(lambda: client.completions.create(model=MODEL, prompt="a", extra_body={field: 1}))
        assert body["param"] == field and f"{field} is not supported by this server" in body["message"]


def test_completion_top_logprobs_are_the_models_top_k_with_echo(client, ref):
    r = client.completions.create(model=MODEL, prompt="The big dog", max_tokens=5, temperature=0, logprobs=3,
                                  echo=True)
    lp = r.choices[0].logprobs
    ids = ref.tokenizer.encode("The big dog", bos=True, eos=False)
    c = ref.submit(ids, 5, temperature=0).wait()
    seq = ids + c.tokens
    full = F.log_softmax(logits(ref.model, torch.tensor([seq]))[0], dim=-1)
    assert len(lp.token_logprobs) == len(seq) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(seq)):
        top = lp.top_logprobs[pos]  # {token text: log-probability}: two tokens of one text share an entry
        expected = full[pos - 1].topk(3).values.tolist()
        assert max(top.values()) == pytest.approx(expected[0], abs=1e-4) and 1 <= len(top) <= 3
        assert all(min(abs(v - e) for e in expected) < 1e-4 for v in top.values())
        assert lp.token_logprobs[pos] == pytest.approx(full[pos - 1, seq[pos]].item(), abs=1e-4)
    assert bad_request(lambda: client.completions.create(model=MODEL, prompt="a", logprobs=21))["param"] == "logprobs"


def test_chat_top_logprobs_carry_each_tokens_own_bytes(client, ref):
    """A byte-fallback token reports its one byte, not the bytes of U+FFFD."""
    byte_token = next(i for i in range(ref.tokenizer.n_words) if ref.tokenizer.sp.is_byte(i)
                      and ref.tokenizer.sp.id_to_piece(i) == "<0xE4>")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2,
                                       logit_bias={str(byte_token): 100})
    content = r.choices[0].logprobs.content
    assert [e.bytes for e in content] == [[0xE4]] * 3 and content[0].token == "bytes:\\xe4"  # as OpenAI writes it
    for e in content:  # the alternatives: the model's own two most likely tokens (before the bias)
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        for alt in e.top_logprobs:
            text = alt.token
            assert alt.bytes == (list(bytes.fromhex(text[6:].replace("\\x", ""))) if text.startswith("bytes:")
                                 else list(text.encode()))


def test_token_id_prompts_are_used_exactly_as_given(client, ref):
    ids = ref.tokenizer.encode(PROMPT, bos=True, eos=False)
    as_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
    no_bos = client.completions.create(model=MODEL, prompt=[ids[1:], ids], max_tokens=10, temperature=0)
    tokens, _ = ref.generate([ids[1:]], max_gen_len=10, temperature=0)  # no BOS added to it
    assert no_bos.choices[0].text == ref.decode_continuation(ids[1:], tokens[0])
    assert no_bos.choices[1].text == as_text.choices[0].text and no_bos.usage.prompt_tokens == 2 * len(ids) - 1
    body = bad_request(lambda: client.completions.create(model=MODEL, prompt=[1, 99999], max_tokens=2))
    assert body["param"] == "prompt" and "token id 99999" in body["message"]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_schema_output_validates_for_many_seeds(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A person?"}],
                                           temperature=1.0, seed=seed, max_tokens=60, response_format=fmt)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(model=MODEL, prompt="Data:", temperature=1.0, seed=1, max_tokens=60,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_guided_regex_and_grammar(client):
    r = client.completions.create(model=MODEL, prompt="Code:", temperature=1.0, seed=2, max_tokens=12, n=3,
                                  extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    import re

    assert all(re.fullmatch("[A-Z]{2}-[0-9]{3}", c.text) for c in r.choices)
    r = client.completions.create(model=MODEL, prompt="Answer:", temperature=1.0, seed=2, max_tokens=8,
                                  extra_body={"guided_grammar": 'root ::= "yes" | "no"'})  # llama.cpp's GBNF
    assert r.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "the json_schema cannot be used"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "input should be 'text', 'json_object' or"),
    ({"guided_regex": "[a-"}, "response_format", "the regex cannot be used"),
    ({"guided_regex": "a", "guided_grammar": 'root ::= "a"'}, "response_format", "ask for one output constraint"),
    ({"repetition_penalty": 0}, "repetition_penalty", "input should be greater than 0"),
    ({"min_p": 1.5}, "min_p", "input should be less than or equal to 1"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "logit_bias[5]=101.0 must be a number in [-100.0, 100.0]"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "logit_bias key 'x' is not a token id"),
    ({"logit_bias": {"99999": 1}}, "logit_bias", "logit_bias names token 99999"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
])
def test_bad_new_fields_are_400s_naming_them(client, extra, param, message):
    body = bad_request(lambda: client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body=extra))
    assert message in body["message"] and body["param"] == param, body
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2).choices  # and it keeps serving


def test_tokenize_and_detokenize(server, ref):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()
    assert ids["tokens"] == ref.tokenizer.encode(PROMPT, bos=True, eos=False) and ids["max_model_len"] == 128
    plain = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert plain["tokens"] == ids["tokens"][1:] and plain["count"] == len(ids["tokens"]) - 1
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == ref.encode_dialog([{"role": "user", "content": "Hi"}])
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": PROMPT}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [-1]}).status_code == 400
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["model_max_length"] == 128 and "[INST]" in info["chat_template"]


# Tools: a tiny Llama 3 model (a byte-level BPE in Llama 3's format, with its special tokens).

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def llama3_client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama3")
    tok = write_tiny_tiktoken(tmp / "tiktoken.model")
    params = {**TINY_PARAMS, "vocab_size": 712, "rope_theta": 500000.0}
    ckpt = write_checkpoint(tmp / "ckpt", params, random_state_dict(ModelArgs.from_params(params), seed=1),
                            tokenizer_path=tok)
    g = Llama.build(str(ckpt), max_seq_len=2048, max_batch_size=4, device="cpu")  # the tool prompt: ~1300 tokens
    with serve_in_thread(g, model_name=MODEL, config=ServeConfig(page=False)) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def check_call(call, tool):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_a_required_tool_call_is_valid_even_on_random_weights(llama3_client):
    for seed in range(3):
        r = llama3_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], seed=seed,
                                                  tool_choice="required", temperature=1.0, max_tokens=120)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        check_call(call, WEATHER if call.function.name == "get_weather" else CLOCK)


def test_a_named_tool_call_streams_as_tool_call_deltas(llama3_client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    whole = llama3_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], seed=5,
                                                  tool_choice=choice, temperature=1.0, max_tokens=60)
    stream = llama3_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], seed=5,
                                                   tool_choice=choice, temperature=1.0, max_tokens=60, stream=True)
    calls, reasons, content = {}, [], ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and content == ""
    assert [c["name"] for c in calls.values()] == ["get_time"] * len(calls)
    assert [json.loads(c["arguments"]) for c in calls.values()] == [
        json.loads(t.function.arguments) for t in whole.choices[0].message.tool_calls]
    check_call(whole.choices[0].message.tool_calls[0], CLOCK)


def test_a_conversation_with_a_tool_result_goes_on(llama3_client):
    first = llama3_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                  temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    answer = llama3_client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                                   tool_choice="none", temperature=0, max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content is not None
    auto = llama3_client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0,
                                                 max_tokens=8)  # random weights: text, not a call
    assert auto.choices[0].finish_reason in ("stop", "length") and auto.choices[0].message.content


def test_bad_tool_requests_are_400s(llama3_client, client):
    for kwargs, param in [(dict(tool_choice="required"), "tool_choice"),
                          (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                           "tool_choice"),
                          (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
                           "tools[0].function.name"),
                          (dict(tools=[WEATHER], response_format={"type": "json_object"}), "response_format")]:
        body = bad_request(lambda: llama3_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                                                         **kwargs))
        assert body["param"] == param, body
    body = bad_request(lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER]))
    assert body["param"] == "tools" and "the llama2 chat format has no tool calls" in body["message"]


# lm-evaluation-harness: its completions backend over HTTP against its Hugging Face backend on our export.

def test_lm_eval_completions_loglikelihoods_equal_its_hf_backend(server, ref, tiny_ckpt, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'lm-eval[api]'")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from llama.hf import write_hf
    from llama.loading import open_checkpoint

    hf_dir = tmp_path / "hf"
    write_hf(open_checkpoint(tiny_ckpt), hf_dir)
    pairs = [("The cat sat on the", " mat"), ("A dog ran", " to the park"), ("Once upon a time", " there was"),
             ("One two", " three four five"), ("The happy bird", " sang")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    api = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=MODEL, num_concurrent=2)
    assert api.tokenizer_backend == "remote"  # found /tokenizer_info and /tokenize
    ours = api.loglikelihood(requests)
    # lm-eval's API models tokenize through our /tokenize without special tokens (as against vLLM); its HF model
    # then must not prepend BOS either, so both score the very same token ids
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=2,
                  add_bos_token=False).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert lm_eval.__version__


TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{choice}doc_to_target: "{{{{{target}}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: {metric}
"""
DOCS = [{"question": "The cat sat on the", "choices": [" mat", " tree", " car"], "label": 0, "answer": "mat"},
        {"question": "A dog ran to the", "choices": [" park", " sea"], "label": 0, "answer": "park"},
        {"question": "One two", "choices": [" three", " four five"], "label": 0, "answer": "three"}]


@pytest.mark.slow
def test_lm_eval_command_runs_both_api_backends_with_their_defaults(server, tiny_ckpt, tmp_path):
    """`lm_eval --model local-completions` (multiple choice: token-id prompts, echo, top_logprobs) and
    `--model local-chat-completions` (generation) against the server, with only base_url and model given; a
    local task, so nothing is downloaded. The completions backend's per-item log-likelihoods equal its Hugging
    Face backend's on the exported folder."""
    pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'lm-eval[api]'")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from conftest import run_python
    from llama.hf import write_hf
    from llama.loading import open_checkpoint

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, kind, target, metric in (("tiny_mc", "multiple_choice", "label", "acc"),
                                        ("tiny_gen", "generate_until", "answer", "exact_match")):
        choice = 'doc_to_choice: "{{choices}}"\n' if kind == "multiple_choice" else ""
        (tmp_path / f"{name}.yaml").write_text(TASK.format(name=name, data=data, kind=kind, target=target,
                                                           metric=metric, choice=choice))
    out = tmp_path / "out"
    for model, path, task, extra in (("local-completions", "/v1/completions", "tiny_mc", []),
                                     ("local-chat-completions", "/v1/chat/completions", "tiny_gen",
                                      ["--apply_chat_template"])):
        proc = run_python("-m", "lm_eval", "--model", model, "--model_args", f"base_url={server.url}{path},model={MODEL}",
                          "--tasks", task, "--include_path", str(tmp_path), "--output_path", str(out), "--log_samples",
                          *extra, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for f in out.rglob("samples_tiny_mc_*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == len(DOCS) and list(out.rglob("samples_tiny_gen_*.jsonl"))
    hf_dir = tmp_path / "hf"
    write_hf(open_checkpoint(tiny_ckpt), hf_dir)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", add_bos_token=False)
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        requests = [Instance("loglikelihood", {}, (a["arg_0"], a["arg_1"]), i)
                    for i, a in enumerate(s["arguments"].values())]
        expected = hf.loglikelihood(requests)
        got = [(float(r[0][0]), r[0][1] == "True") for r in s["resps"]]
        for (a, greedy_a), (b, greedy_b) in zip(got, expected):
            assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
