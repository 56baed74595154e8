import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.generation import B_INST, B_SYS, E_INST, E_SYS

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
    logits = tiny_llama.model(torch.tensor([seq]), 0)[0]
    expected = logits[len(prompt) - 1 : len(seq) - 1].argmax(-1).tolist()
    assert tokens[0] == expected


def test_logprobs_and_echo_match_a_full_forward(tiny_llama):
    prompt = tiny_llama.tokenizer.encode("The big dog", bos=True, eos=False)
    tokens, logprobs = tiny_llama.generate([prompt], max_gen_len=8, temperature=0.8, top_p=0.95,
                                           logprobs=True, echo=True)
    seq = tokens[0]
    assert seq[: len(prompt)] == prompt and len(seq) == len(prompt) + 8
    full = F.log_softmax(tiny_llama.model(torch.tensor([seq]), 0)[0], dim=-1)
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
    full, _ = tiny_llama.generate([list(range(3, 67))], max_gen_len=5, temperature=0)
    assert full == [[]]


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
])
def test_bad_sampling_arguments_are_refused(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
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


def test_llama2_chat_format(tiny_llama):
    tok = tiny_llama.tokenizer
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Tell me a story"},
    ]
    expected = (
        tok.encode(f"{B_INST} {B_SYS}Be brief.{E_SYS}Hi there {E_INST} Hello! ", bos=True, eos=True)
        + tok.encode(f"{B_INST} Tell me a story {E_INST}", bos=True, eos=False)
    )
    assert tiny_llama.encode_dialog(dialog) == expected
    out = tiny_llama.chat_completion([[{"role": "user", "content": "Hi"}]], temperature=0, max_gen_len=4)[0]
    assert out["generation"]["role"] == "assistant" and isinstance(out["generation"]["content"], str)


@pytest.mark.parametrize("dialog, message", [
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with the user"),
    ([{"role": "user", "content": "say [INST] now"}], "reserved chat tag"),
    ([{"role": "robot", "content": "a"}], "role"),
])
def test_bad_dialogs_are_refused(tiny_llama, dialog, message):
    with pytest.raises(ValueError, match=message):
        tiny_llama.chat_completion([dialog])
