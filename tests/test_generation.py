import re

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from conftest import asset, logits
from llama.chat_format import encode_dialog
from llama.tokenizer import Tokenizer
from llama.errors import LogitsError
from llama.sampling import sample

PROMPTS = ["The cat sat on the", "A", "Then the brave little girl ran into the dark forest and", "One two"]


def test_mixed_length_batch_gives_each_prompt_its_solo_completion(tiny_llama):
    batch = tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    for prompt, result in zip(PROMPTS, batch):
        alone = tiny_llama.text_completion([prompt], temperature=0, max_gen_len=12)[0]
        assert result["generation"] == alone["generation"]
    assert len({r["generation"] for r in batch}) > 1


def test_greedy_tokens_follow_the_full_forward_argmax(tiny_llama):
    """Each greedy token is the argmax of an uncached forward over everything before it."""
    prompt = tiny_llama.tokenizer.encode("The cat sat", bos=True, eos=False)
    tokens, _ = tiny_llama.generate([prompt], max_gen_len=10, temperature=0)
    seq = prompt + tokens[0]
    logits_ = logits(tiny_llama.model, torch.tensor([seq]))[0]
    expected = logits_[len(prompt) - 1 : len(seq) - 1].argmax(-1).tolist()
    assert tokens[0] == expected


def test_logprobs_and_echo_match_a_full_forward(tiny_llama):
    prompt = tiny_llama.tokenizer.encode("The big dog", bos=True, eos=False)
    tokens, logprobs = tiny_llama.generate([prompt], max_gen_len=8, temperature=0.8, top_p=0.95,
                                           logprobs=True, echo=True)
    seq = tokens[0]
    assert seq[: len(prompt)] == prompt and len(seq) == len(prompt) + 8
    full = F.log_softmax(logits(tiny_llama.model, torch.tensor([seq]))[0], dim=-1)
    expected = [0.0] + full[:-1].gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1).tolist()
    assert logprobs[0] == pytest.approx(expected, abs=1e-4)
    assert all(lp <= 0 for lp in logprobs[0])


def test_text_completion_returns_meta_fields(tiny_llama):
    out = tiny_llama.text_completion(["Once"], temperature=0, max_gen_len=5, logprobs=True)[0]
    assert set(out) == {"generation", "tokens", "logprobs"}
    assert len(out["tokens"]) == len(out["logprobs"]) == 5
    plain = tiny_llama.text_completion(["Once"], temperature=0, max_gen_len=5)[0]
    assert set(plain) == {"generation"} and plain["generation"] == out["generation"]


def test_generation_stops_at_eos(tiny_llama, monkeypatch):
    prompt = tiny_llama.tokenizer.encode("The cat", bos=True, eos=False)
    free, _ = tiny_llama.generate([prompt], max_gen_len=10, temperature=0)
    stop = free[0][3]
    monkeypatch.setattr(tiny_llama.tokenizer, "eos_id", stop)
    cut, _ = tiny_llama.generate([prompt, prompt], max_gen_len=10, temperature=0)
    assert cut[0] == free[0][: free[0].index(stop)]
    assert cut[1] == cut[0]


def test_generation_respects_max_seq_len(tiny_llama):
    prompt = list(range(3, 3 + 60))  # 60 of max_seq_len=64
    tokens, _ = tiny_llama.generate([prompt, [1, 5]], max_gen_len=50, temperature=0)
    assert len(tokens[0]) == 4 and len(tokens[1]) == 50
    # A prompt that fills max_seq_len leaves no room for a new token: refused when submitted.
    with pytest.raises(ValueError, match="prompt 0 has 64 tokens, which leaves no room for a new one in "
                                         "max_seq_len=64"):
        tiny_llama.generate([list(range(3, 67))], max_gen_len=5, temperature=0)


def test_same_seed_repeats_a_sampled_output(tiny_ckpt):
    def sample(seed):
        g = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2,
                        seed=seed)
        return g.text_completion(["The cat", "A dog"], temperature=1.0, top_p=0.95, max_gen_len=20)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_top_p_near_zero_is_greedy(tiny_llama):
    greedy = tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=10)
    nucleus = tiny_llama.text_completion(PROMPTS, temperature=0.9, top_p=1e-6, max_gen_len=10)
    assert nucleus == greedy


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(max_gen_len=-1), "max_gen_len=-1"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(top_k=1.5), "top_k=1.5"),
    (dict(stop=""), "stop=''"),
    (dict(stop=["a", 3]), "stop=['a', 3]"),
    (dict(stop_tokens=[99999]), "stop_tokens=[99999]"),
])
def test_bad_sampling_arguments_are_refused(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_llama.text_completion(["Once"], **kwargs)


def test_too_many_or_too_long_prompts_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="5 prompts exceed max_batch_size=4"):
        tiny_llama.text_completion(["a"] * 5)
    with pytest.raises(ValueError, match="prompt 1 has 65 tokens, more than max_seq_len=64"):
        tiny_llama.generate([[1, 2], [1] * 65], max_gen_len=4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        tiny_llama.generate([[]], max_gen_len=4)
    with pytest.raises(ValueError, match="outside"):
        tiny_llama.generate([[1, 99999]], max_gen_len=4)


DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "Tell me a story"},
]


def test_llama2_chat_format(tiny_llama):
    sp = tiny_llama.tokenizer.sp  # SentencePiece itself, not our encode
    expected = ([1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! ") + [2]
                + [1] + sp.encode("[INST] Tell me a story [/INST]"))
    assert tiny_llama.encode_dialog(DIALOG) == expected
    out = tiny_llama.chat_completion([[{"role": "user", "content": "Hi"}]], temperature=0, max_gen_len=4)[0]
    tokens, _ = tiny_llama.generate([[1] + sp.encode("[INST] Hi [/INST]")], max_gen_len=4, temperature=0)
    assert out["generation"] == {"role": "assistant", "content": tiny_llama.tokenizer.decode(tokens[0])}


def test_llama2_chat_ids_of_the_real_tokenizer():
    tok = Tokenizer(asset("llama_tokenizer.model"))
    assert encode_dialog(tok, DIALOG) == [
        1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 3629, 11473, 29889, 13, 29966, 829, 14816, 29903, 6778,
        13, 13, 18567, 727, 518, 29914, 25580, 29962, 15043, 29991, 29871, 2,
        1, 518, 25580, 29962, 24948, 592, 263, 5828, 518, 29914, 25580, 29962]
    assert encode_dialog(tok, [{"role": "user", "content": "Hi"}]) == [1, 518, 25580, 29962, 6324, 518, 29914, 25580,
                                                                      29962]


@pytest.mark.parametrize("dialog, message", [
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with the user"),
    ([{"role": "user", "content": "say [INST] now"}], "reserved chat tag '\\[INST\\]'"),
    ([{"role": "robot", "content": "a"}], "role"),
])
def test_bad_dialogs_are_refused(tiny_llama, dialog, message):
    with pytest.raises(ValueError, match=message):
        tiny_llama.chat_completion([dialog])


def test_padded_rows_leave_exact_blocks_for_the_prefix_cache(tiny_ckpt):
    """Batched prefill pads short prompts; the pads must write nowhere a row reads. The blocks the batch
    fills are then cached, and a later run of each prompt alone, which takes its prefix from them,
    must give the tokens and log-probabilities of a run without any cache."""
    kwargs = dict(max_seq_len=96, max_batch_size=3, device="cpu", prefill_chunk=64)
    g = Llama.build(str(tiny_ckpt), **kwargs)
    fresh = Llama.build(str(tiny_ckpt), prefix_cache=False, **kwargs)
    texts = [" ".join([PROMPTS[2]] * 2), " ".join([PROMPTS[0]] * 3), " ".join([PROMPTS[3]] * 12)]
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    assert min(map(len, prompts)) > 16 and len(set(map(len, prompts))) == 3  # a full block each, padding between
    g.generate(prompts, max_gen_len=6, temperature=0)
    for prompt in prompts:
        again = g.submit(prompt, 6, temperature=0, logprobs=True).wait()
        assert again.cached_tokens >= 16
        expected, lps = fresh.generate([prompt], max_gen_len=6, temperature=0, logprobs=True)
        assert again.tokens == expected[0]
        torch.testing.assert_close(torch.tensor(again.logprobs), torch.tensor(lps[0]), atol=1e-5, rtol=1e-5)


def _token_texts(g, prompt_ids, tokens):
    """The text each generated token adds, in order."""
    return [g.decode_continuation(prompt_ids + tokens[:k], [t]) for k, t in enumerate(tokens)]


def test_stop_string_straddling_tokens_cuts_the_text(tiny_llama):
    prompt = "The cat sat on the"
    ids = tiny_llama.tokenizer.encode(prompt, bos=True, eos=False)
    free = tiny_llama.text_completion([prompt], temperature=0, max_gen_len=20)[0]["generation"]
    tokens, _ = tiny_llama.generate([ids], max_gen_len=20, temperature=0)
    texts = _token_texts(tiny_llama, ids, tokens[0])
    k = next(k for k in range(3, 19) if len(texts[k]) >= 2 and len(texts[k + 1]) >= 2)
    stop = texts[k][-2:] + texts[k + 1][:2]  # ends inside token k+1, starts inside token k
    expected = free[: free.index(stop)]
    assert stop not in expected and expected

    out = tiny_llama.text_completion([prompt, prompt], temperature=0, max_gen_len=20, stop=["zzz", stop])
    assert [o["generation"] for o in out] == [expected, expected]
    cut, _ = tiny_llama.generate([ids], max_gen_len=20, temperature=0, stop=stop)
    n = len(cut[0])  # generation ends with the token that completed the stop string
    assert cut[0] == tokens[0][:n] and stop in "".join(texts[:n]) and stop not in "".join(texts[: n - 1])
    streamed = "".join(p[0] for p in tiny_llama.stream([prompt], temperature=0, max_gen_len=20, stop=stop))
    assert streamed == expected


def test_earliest_stop_string_wins_per_row(tiny_llama):
    free = tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=16)
    stops = [free[0]["generation"][6:9], free[2]["generation"][3:5]]
    batch = tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=16, stop=stops)
    for f, b in zip(free, batch):
        text = f["generation"]
        cut = min([text.index(s) for s in stops if s in text], default=len(text))
        assert b["generation"] == text[:cut]
    assert batch[0]["generation"] == free[0]["generation"][:6]


def test_extra_stop_tokens_end_their_row(tiny_llama):
    prompt = tiny_llama.tokenizer.encode("The cat", bos=True, eos=False)
    free, _ = tiny_llama.generate([prompt, [1]], max_gen_len=10, temperature=0)
    stop = free[0][5]
    cut, lps = tiny_llama.generate([prompt, [1]], max_gen_len=10, temperature=0, stop_tokens=[stop], logprobs=True)
    for f, c, lp in zip(free, cut, lps):
        assert c == (f[: f.index(stop)] if stop in f else f) and len(lp) == len(c)


def test_top_k(tiny_llama):
    greedy = tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=10)
    assert tiny_llama.text_completion(PROMPTS, temperature=1.5, top_p=1.0, top_k=1, max_gen_len=10) == greedy
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    top5 = logits.topk(5, dim=-1).indices
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    picks = torch.stack([sample(logits, [2.0] * 3, [1.0] * 3, [5] * 3, [0.0] * 3, gens) for _ in range(300)], 1)
    assert all(set(picks[i].tolist()) == set(top5[i].tolist()) for i in range(3))
    # Rows keep their own parameters: a greedy row beside sampled ones, top-k 1 beside top-k 5.
    mixed = sample(logits, [0.0, 2.0, 2.0], [1.0, 1.0, 1.0], [0, 1, 5], [0.0] * 3, gens)
    assert mixed[:2].tolist() == logits[:2].argmax(-1).tolist() and mixed[2].item() in top5[2].tolist()


@pytest.mark.parametrize("temperature", [0, 0.8])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_unusable_logits_raise(tiny_llama, monkeypatch, bad, temperature):
    logits_of = tiny_llama.model.logits

    def broken(h):
        out = logits_of(h)
        out[-1] = bad  # the last row: prompt 1
        return out

    monkeypatch.setattr(tiny_llama.model, "logits", broken)
    with pytest.raises(LogitsError, match="row 1 at generation step 0: the model's logits are NaN, \\+inf or all -inf"):
        tiny_llama.generate([[1, 5], [1, 7, 9]], max_gen_len=4, temperature=temperature)
