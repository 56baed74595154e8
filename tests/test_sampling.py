"""Sampling controls against independent references: transformers' logits processors and warpers, OpenAI's
penalty formula computed by hand from full forwards, top log-probabilities from a full forward, and
outputs constrained by a JSON Schema checked with `jsonschema`."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import logits as full_logits
from conftest import script
from llama import Llama
from llama.sampling import Constraint, SamplingParams, warp

PROMPT = "The cat sat on the mat and the dog"


@pytest.fixture(scope="module")
def g(tiny_ckpt) -> Llama:
    return Llama.build(str(tiny_ckpt), max_seq_len=128, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def stories(stories_ckpt) -> Llama:
    """The real stories260K, whose greedy stories repeat themselves: penalties change them."""
    return Llama.build(str(stories_ckpt), max_seq_len=256, max_batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def hf(stories_ckpt):
    return script("benchmark").hf_model(str(stories_ckpt), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_greedy_equals_transformers(stories, hf, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor (CTRL's rule, over prompt and output) in its greedy generate."""
    g = stories
    prompt = g.tokenizer.encode("Once upon a time", bos=True, eos=False)
    ours, _ = g.generate([prompt], max_gen_len=60, temperature=0, repetition_penalty=penalty)
    plain, _ = g.generate([prompt], max_gen_len=60, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=60, do_sample=False, repetition_penalty=penalty, eos_token_id=None,
                             pad_token_id=0)
    assert ours[0] == theirs[0, len(prompt):].tolist()[: len(ours[0])]
    assert ours[0] != plain[0]  # the penalty changed the text


def test_min_p_top_k_top_p_and_temperature_filter_as_transformers_warpers():
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 3
    settings = [(0.7, 0.9, 0, 0.05), (1.3, 1.0, 20, 0.1), (1.0, 0.5, 0, 0.0), (0.5, 0.95, 50, 0.3)]
    for row, (t, p, k, m) in enumerate(settings):
        ranked, order, probs = warp(logits[row : row + 1], [t], [p], [k], [m])
        ours = torch.zeros(300).scatter(0, order[0], probs[0])
        ours = ours / ours.sum()
        scores = logits[row : row + 1]
        for warper in [TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else []) + \
                [TopPLogitsWarper(p)] + ([MinPLogitsWarper(m)] if m else []):
            scores = warper(None, scores)
        theirs = torch.softmax(scores, dim=-1)[0]
        assert torch.equal(ours > 0, theirs > 0), f"row {row}: kept tokens differ"
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_frequency_and_presence_penalties_follow_openais_formula(stories):
    """Greedy with the penalties equals a hand-run loop: each step's full-forward logits minus
    frequency x count + presence x [count > 0] of the tokens generated so far, then the argmax."""
    g = stories
    prompt = g.tokenizer.encode("Once upon a time", bos=True, eos=False)
    freq, pres = 0.9, 0.6
    ours, _ = g.generate([prompt], max_gen_len=40, temperature=0, frequency_penalty=freq, presence_penalty=pres)
    seq, out = list(prompt), []
    counts = torch.zeros(g.model.vocab_size)
    for _ in range(len(ours[0])):
        row = full_logits(g.model, torch.tensor([seq]))[0, -1] - freq * counts - pres * (counts > 0)
        token = int(row.argmax())
        out.append(token)
        seq.append(token)
        counts[token] += 1
    assert ours[0] == out
    assert ours[0] != g.generate([prompt], max_gen_len=40, temperature=0)[0][0]  # the penalties changed the text


def test_logit_bias_adds_to_the_logits(g):
    prompt = g.tokenizer.encode(PROMPT, bos=True, eos=False)
    plain, _ = g.generate([prompt], max_gen_len=8, temperature=0)
    forced, _ = g.generate([prompt], max_gen_len=8, temperature=0, logit_bias={77: 100.0})
    assert forced[0] == [77] * 8
    banned, _ = g.generate([prompt], max_gen_len=1, temperature=0, logit_bias={plain[0][0]: -100.0})
    assert banned[0][0] != plain[0][0]
    # JSON object keys (strings) are token ids too
    assert g.generate([prompt], max_gen_len=2, temperature=0, logit_bias={"77": 100})[0] == [[77, 77]]


def test_top_logprobs_are_the_models_own_top_k(g):
    prompt = "The big dog"
    out = g.text_completion([prompt], temperature=0, max_gen_len=6, logprobs=True, top_logprobs=5, echo=True)[0]
    ids = g.tokenizer.encode(prompt, bos=True, eos=False)
    c = g.submit(ids, 6, temperature=0, logprobs=True, echo=True, top_logprobs=5).wait()
    seq = ids + c.tokens
    expected = F.log_softmax(full_logits(g.model, torch.tensor([seq]))[0], dim=-1)
    for pos, alts in enumerate(c.request.prompt_top_logprobs + c.request.token_top_logprobs):
        values, tokens = expected[pos].topk(5)
        assert [t for t, _ in alts] == tokens.tolist()
        assert [lp for _, lp in alts] == pytest.approx(values.tolist(), abs=1e-5)
    assert out["top_logprobs"][0] is None and len(out["top_logprobs"]) == len(seq)
    assert all(len(d) <= 5 for d in out["top_logprobs"][1:])


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


def test_outputs_under_a_json_schema_validate_for_every_seed(g):
    """Random weights, temperature 1: only the constraint makes the text JSON."""
    jsonschema = pytest.importorskip("jsonschema")
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    outs = g.text_completion(["Person:"] * 4, temperature=1.0, top_p=1.0, max_gen_len=100, seed=11,
                             constraint=constraint)
    outs += g.text_completion(["Another:"] * 4, temperature=1.0, top_p=1.0, max_gen_len=100, seed=99,
                              constraint=constraint)
    for out in outs:
        jsonschema.validate(json.loads(out["generation"]), SCHEMA)
    unconstrained = g.text_completion(["Person:"], temperature=1.0, max_gen_len=30, seed=11)[0]["generation"]
    with pytest.raises(ValueError):
        json.loads(unconstrained)


def test_regex_and_json_object_constraints(g):
    out = g.text_completion(["Code:"] * 3, temperature=1.0, max_gen_len=20, seed=5,
                            constraint=Constraint("regex", "[a-z]{3}-[0-9]{2}"))
    import re

    assert all(re.fullmatch("[a-z]{3}-[0-9]{2}", o["generation"]) for o in out)
    obj = g.text_completion(["Data:"], temperature=1.0, max_gen_len=60, seed=2,
                            constraint=Constraint("json_object"))[0]["generation"]
    assert isinstance(json.loads(obj), dict)


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=0), "repetition_penalty=0 must be a number > 0"),
    (dict(presence_penalty=2.5), "presence_penalty=2.5 must be a number in [-2.0, 2.0]"),
    (dict(frequency_penalty="x"), "frequency_penalty='x'"),
    (dict(min_p=1.5), "min_p=1.5 must be a number in [0.0, 1.0]"),
    (dict(logit_bias={5: 101}), "logit_bias[5]=101 must be a number in [-100.0, 100.0]"),
    (dict(logit_bias={-1: 1}), "logit_bias key -1 is not a token id"),
    (dict(logit_bias={9999: 1}), "logit_bias names token 9999: ids must be in [0, 512)"),
    (dict(logit_bias={i: 1 for i in range(301)}), "logit_bias has 301 entries: at most 300"),
    (dict(top_logprobs=21), "top_logprobs=21 must be at most 20"),
    (dict(constraint=Constraint("regex", "[a-")), "the regex cannot be used"),
    (dict(constraint=Constraint("json_schema", '{"type": "nope"}')), "the json_schema cannot be used"),
    (dict(constraint=Constraint("json_schema", "{oops")), "the json_schema is not valid JSON"),
])
def test_bad_sampling_controls_are_refused_by_name(g, kwargs, message):
    with pytest.raises(ValueError) as e:
        g.text_completion(["The cat"], max_gen_len=4, **kwargs)
    assert message in str(e.value)


def test_an_unknown_sampling_argument_is_refused_not_ignored(g):
    with pytest.raises(TypeError, match="unknown sampling argument.s. typical_p: the others are constraint, "):
        g.text_completion(["The cat"], max_gen_len=4, typical_p=0.5)


def test_sampling_params_are_one_checked_value():
    p = SamplingParams(temperature=0.5, logit_bias={"3": 1.5, 2: -1}, stop="x", repetition_penalty=1.1)
    assert p.logit_bias == ((2, -1.0), (3, 1.5)) and p.stop == ("x",) and p.penalized
    assert not SamplingParams().penalized
    with pytest.raises(ValueError, match="constraint kind 'xml'"):
        Constraint("xml", "<a/>")


def test_the_commands_take_the_penalties(stories, stories_ckpt):
    """llama-generate's --repetition_penalty and --frequency_penalty give the library's text."""
    from conftest import run_main
    from llama.commands import generate

    code, out, _ = run_main(generate.main, "--ckpt_dir", str(stories_ckpt), "--prompts", "Once upon a time",
                            "--temperature", "0", "--max_gen_len", "40", "--repetition_penalty", "1.3",
                            "--frequency_penalty", "0.5")
    expected = stories.text_completion(["Once upon a time"], temperature=0, max_gen_len=40, repetition_penalty=1.3,
                                       frequency_penalty=0.5)[0]["generation"]
    assert code == 0 and out.startswith("Once upon a time" + expected)
