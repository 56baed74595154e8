"""Scoring: summed continuation log-probabilities, greedy flags and perplexity."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import generation_worker
from conftest import logits, torchrun
from llama import Llama


def full_forward_logprobs(g, seq):
    """Log-probability of each token of `seq` after the first, from one uncached forward."""
    lp = F.log_softmax(logits(g.model, torch.tensor([seq]))[0], dim=-1)
    return lp[:-1].gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1), lp[:-1].argmax(-1)


def test_scores_equal_summed_logprobs_of_a_full_forward(tiny_llama):
    gen = torch.Generator().manual_seed(0)
    pairs = [([1] + torch.randint(3, 500, (n,), generator=gen).tolist(),
              torch.randint(3, 500, (m,), generator=gen).tolist()) for n, m in [(3, 5), (0, 1), (20, 9), (7, 30),
                                                                             (1, 2), (11, 11)]]
    scores = tiny_llama.score_tokens(pairs)  # 6 pairs: two batches of max_batch_size=4
    for (context, continuation), s in zip(pairs, scores):
        lp, _ = full_forward_logprobs(tiny_llama, context + continuation)
        assert s.n_tokens == len(continuation)
        assert s.logprob == pytest.approx(float(lp[len(context) - 1 :].sum()), abs=1e-3)
        assert not s.is_greedy


def test_greedy_continuation_is_flagged(tiny_llama):
    prompt = tiny_llama.tokenizer.encode("The cat sat", bos=True, eos=False)
    tokens, logprobs = tiny_llama.generate([prompt], max_gen_len=8, temperature=0, logprobs=True)
    greedy = tokens[0]
    other = greedy[:-1] + [(greedy[-1] + 1) % 500 + 3]
    s_greedy, s_other = tiny_llama.score_tokens([(prompt, greedy), (prompt, other)])
    assert s_greedy.is_greedy and not s_other.is_greedy
    assert s_greedy.logprob == pytest.approx(sum(logprobs[0]), abs=1e-3)
    assert s_other.logprob < s_greedy.logprob


def test_text_pairs_split_at_the_context_tokens(tiny_llama):
    tok = tiny_llama.tokenizer
    pairs = [("The cat sat on the", " mat"), ("", "Hello there."), ("A dog", " ran 🦙 far")]
    for (context, continuation), s in zip(pairs, tiny_llama.score(pairs)):
        head = tok.encode(context, bos=True, eos=False)
        whole = tok.encode(context + continuation, bos=True, eos=False)
        assert whole[: len(head)] == head and s.n_tokens == len(whole) - len(head)
        lp, _ = full_forward_logprobs(tiny_llama, whole)
        assert s.logprob == pytest.approx(float(lp[len(head) - 1 :].sum()), abs=1e-3)


def test_perplexity(tiny_llama):
    texts = ["The cat sat on the mat.", "Once upon a time 世界"]
    for text, ppl in zip(texts, tiny_llama.perplexity(texts)):
        lp, _ = full_forward_logprobs(tiny_llama, tiny_llama.tokenizer.encode(text, bos=True, eos=False))
        assert ppl == pytest.approx(math.exp(-float(lp.mean())), rel=1e-4)


def test_bad_scoring_input(tiny_llama):
    with pytest.raises(ValueError, match="pair 1 has an empty context or continuation"):
        tiny_llama.score_tokens([([1], [5]), ([1], [])])
    with pytest.raises(ValueError, match=r"pair 0 \(context \+ continuation\) has 70 tokens, more than max_seq_len"):
        tiny_llama.score_tokens([([1] * 40, [5] * 30)])
    with pytest.raises(ValueError, match="pair 0 has an empty context or continuation"):
        tiny_llama.score([("The cat", "")])


@pytest.mark.slow
def test_two_processes_match_one(tiny_ckpt, tiny_ckpt2, tmp_path):
    proc = torchrun(2, "tests/generation_worker.py", str(tiny_ckpt2), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank holds the same gathered logits, so samples alike
    one = generation_worker.run(Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=64,
                                            max_batch_size=3, seed=3))
    for (lp2, greedy2, n2), (lp1, greedy1, n1) in zip(ranks[0]["scores"], one["scores"]):
        assert lp2 == pytest.approx(lp1, abs=1e-3) and (greedy2, n2) == (greedy1, n1)
    assert ranks[0]["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4)
    assert ranks[0]["stopped"] == one["stopped"] and ranks[0]["streamed"] == one["streamed"]
