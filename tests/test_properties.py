"""Property-based input battery over the public API.

Every input either gets a clear ValueError/TypeError naming the argument, or an output that keeps
every limit. CI runs the bounded, derandomized "ci" profile; `pytest --hypothesis-profile=long`
searches longer.
"""
import math

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conftest import asset
from llama import Tokenizer

MAX_SEQ_LEN, MAX_BATCH = 64, 4

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\t\n", "\x00\x07", "🦙🦙 世界", "a" * 10_000, "\ud800 lone surrogate"]),
)
sampling = st.fixed_dictionaries({
    "temperature": st.one_of(st.sampled_from([0.0, 1e-300, 1e-6, 1.0, 1e6, float("nan"), float("inf")]),
                             st.floats(-1, 3)),
    "top_p": st.one_of(st.sampled_from([1e-9, 1.0, float("nan")]), st.floats(-0.5, 1.5)),
    "top_k": st.sampled_from([0, 1, 2, 600, -1]),
    "max_gen_len": st.integers(-2, 80),
    "stop": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
})
ARGUMENTS = ("temperature", "top_p", "top_k", "max_gen_len", "stop", "prompt", "max_batch_size", "surrogate")
quick = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _valid_sampling(temperature, top_p, top_k, max_gen_len, stop) -> bool:
    return temperature >= 0 and 0 < top_p <= 1 and top_k >= 0 and max_gen_len >= 0


@quick
@given(prompts=st.lists(texts, min_size=0, max_size=6), kw=sampling, logprobs=st.booleans(), echo=st.booleans())
# Failures the battery found once; kept as fixed examples.
@example(prompts=["\ud800 lone surrogate"], kw=dict(temperature=0.0, top_p=1.0, top_k=0, max_gen_len=0, stop=None), logprobs=False,
         echo=False)
@example(prompts=[""], kw=dict(temperature=2.5e-159, top_p=1e-9, top_k=0, max_gen_len=1, stop=None), logprobs=False, echo=False)
def test_text_completion_answers_or_refuses_clearly(tiny_llama, prompts, kw, logprobs, echo):
    tok = tiny_llama.tokenizer
    try:
        results = tiny_llama.text_completion(prompts, logprobs=logprobs, echo=echo, **kw)
    except (ValueError, TypeError) as e:
        message = str(e)
        assert any(name in message for name in ARGUMENTS), message
        return
    assert _valid_sampling(**kw)
    assert len(results) == len(prompts)
    for prompt, result in zip(prompts, results):
        prompt_len = len(tok.encode(prompt, bos=True, eos=False))
        assert isinstance(result["generation"], str)
        stops = [kw["stop"]] if isinstance(kw["stop"], str) else kw["stop"] or []
        if not echo:
            assert not any(s in result["generation"] for s in stops)
        if logprobs:
            n_new = len(result["tokens"]) - (prompt_len if echo else 0)
            assert 0 <= n_new <= kw["max_gen_len"] and prompt_len + n_new <= MAX_SEQ_LEN
            assert len(result["logprobs"]) == len(result["tokens"])
            assert all(math.isfinite(lp) and lp <= 0 for lp in result["logprobs"])


@quick
@given(prompt_tokens=st.lists(st.lists(st.integers(-3, 600), max_size=70), max_size=6), kw=sampling)
def test_generate_keeps_every_limit(tiny_llama, prompt_tokens, kw):
    try:
        tokens, logprobs = tiny_llama.generate(prompt_tokens, logprobs=True, **kw)
    except (ValueError, TypeError) as e:
        assert any(name in str(e) for name in ARGUMENTS), str(e)
        return
    vocab = tiny_llama.model.vocab_size
    for prompt, new, lps in zip(prompt_tokens, tokens, logprobs):
        assert len(new) <= kw["max_gen_len"] and len(prompt) + len(new) <= MAX_SEQ_LEN
        assert all(0 <= t < vocab for t in new) and tiny_llama.tokenizer.eos_id not in new
        assert len(lps) == len(new) and all(math.isfinite(lp) and lp <= 0 for lp in lps)


@given(st.text(max_size=200))
def test_real_llama_tokenizer_round_trips_any_text(text):
    tok = _real_tokenizer()
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in text))
    ids = tok.encode(text, bos=True, eos=True)
    assert all(0 <= i < tok.n_words for i in ids)
    assert tok.decode(ids) == text


_REAL = {}


def _real_tokenizer() -> Tokenizer:
    if "tok" not in _REAL:
        _REAL["tok"] = Tokenizer(asset("llama_tokenizer.model"))
    return _REAL["tok"]
