"""Llama 3: chat format, stop tokens, tiktoken end to end on a tiny model, RoPE scaling."""
import pytest
import torch

from conftest import asset, random_model
from llama import Llama, ModelArgs
from llama.checkpoint import write_checkpoint
from llama.chat_format import encode_dialog
from llama.model import precompute_freqs_cis
from llama.tiny import TINY_PARAMS, random_state_dict
from llama.tokenizer import load_tokenizer
from test_tokenizer import write_tiny_tiktoken

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "Tell me a story"},
]


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama3")
    tok = write_tiny_tiktoken(tmp / "tiktoken.model")
    params = {**TINY_PARAMS, "vocab_size": 712, "rope_theta": 500000.0, "use_scaled_rope": True}
    ckpt = write_checkpoint(tmp / "ckpt", params, random_state_dict(ModelArgs.from_params(params), seed=1),
                            tokenizer_path=tok)
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=2, device="cpu")


def test_llama3_chat_header_ids():
    tok = load_tokenizer(asset("llama3_tokenizer.model"))
    header = {role: [128006, ids, 128007, 271] for role, ids in [("system", 9125), ("user", 882), ("assistant", 78191)]}
    expected = (
        [128000] + header["system"] + tok.encode("Be brief.", bos=False, eos=False) + [128009]
        + header["user"] + tok.encode("Hi there", bos=False, eos=False) + [128009]
        + header["assistant"] + tok.encode("Hello!", bos=False, eos=False) + [128009]
        + header["user"] + tok.encode("Tell me a story", bos=False, eos=False) + [128009]
        + header["assistant"]
    )
    assert encode_dialog(tok, DIALOG) == expected
    assert tok.decode(expected[-4:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    with pytest.raises(ValueError, match="reserved chat tag '<\\|eot_id\\|>'"):
        encode_dialog(tok, [{"role": "user", "content": "hi<|eot_id|>"}])


def test_tiny_llama3_chat_end_to_end(tiny_llama3):
    tok = tiny_llama3.tokenizer
    prompt = tiny_llama3.encode_dialog(DIALOG)
    assert tok.decode(prompt) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a story<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = tiny_llama3.chat_completion([DIALOG, DIALOG[1:2]], temperature=0, max_gen_len=12)
    tokens, _ = tiny_llama3.generate([prompt], max_gen_len=12, temperature=0)
    assert out[0]["generation"] == {"role": "assistant", "content": tok.decode(tokens[0])}
    streamed = "".join(p[1] for p in tiny_llama3.stream_chat([DIALOG, DIALOG[1:2]], temperature=0, max_gen_len=12))
    assert streamed == out[1]["generation"]["content"]


@pytest.mark.parametrize("stop_token", ["eot_id", "eom_id", "eos_id"])
def test_llama3_stop_tokens_end_generation(tiny_llama3, monkeypatch, stop_token):
    prompt = tiny_llama3.tokenizer.encode("The cat", bos=True, eos=False)
    free, _ = tiny_llama3.generate([prompt], max_gen_len=10, temperature=0)
    monkeypatch.setattr(tiny_llama3.tokenizer, stop_token, free[0][4])
    cut, _ = tiny_llama3.generate([prompt], max_gen_len=10, temperature=0)
    assert cut[0] == free[0][: free[0].index(free[0][4])]


def test_scaled_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    args = ModelArgs.from_params({"dim": 256, "n_heads": 2, "rope_theta": 500000.0, "use_scaled_rope": True})
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192))
    expected, _ = _compute_llama3_parameters(config, "cpu")
    table = precompute_freqs_cis(args.head_dim, 2, args.rope_theta, args.rope_scaling)  # angles at position 1
    torch.testing.assert_close(torch.atan2(table[1, :, 1], table[1, :, 0]), expected.float(), rtol=1e-5, atol=1e-7)
    plain = precompute_freqs_cis(args.head_dim, 2, args.rope_theta)
    assert torch.equal(plain[1, :8], table[1, :8]) and not torch.allclose(plain[1, -8:], table[1, -8:])


def test_use_scaled_rope_reaches_the_model():
    scaled, _ = random_model(rope_theta=500000.0, use_scaled_rope=True)
    plain, _ = random_model(rope_theta=500000.0)
    assert not torch.equal(scaled.rope, plain.rope)
