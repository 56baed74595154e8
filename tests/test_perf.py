"""The fast paths (fused weights, the compiled decode step) give the plain path's logits and tokens."""
import pytest
import torch

from conftest import random_model
from llama import Llama


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_fused_weights_match_checkpoint_layout(n_kv_heads):
    plain, sd = random_model(n_kv_heads=n_kv_heads)
    fused, _ = random_model(n_kv_heads=n_kv_heads)
    fused.fuse_()
    assert not hasattr(fused.layers[0].attention, "wq") and fused.layers[0].feed_forward.w13 is not None
    tokens = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(fused(tokens[:, :8], 0), plain(tokens[:, :8], 0), atol=1e-5, rtol=1e-5)
    # decode steps at per-row positions, as generate() makes them
    for p in range(8, 12):
        pos = torch.full((3,), p)
        torch.testing.assert_close(fused(tokens[:, p:p + 1], pos), plain(tokens[:, p:p + 1], pos),
                                   atol=1e-5, rtol=1e-5)


def test_per_row_positions_write_each_row_at_its_own_place():
    """Rows at different positions: each equals that row decoded alone."""
    model, _ = random_model()
    model.fuse_()
    a = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(7))
    b = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(8))
    alone = [model(a, 0)[:, -1], model(b, 0)[:, -1]]
    model(torch.cat([a[:, :8], torch.cat([b[:, :4], b[:, :4]], 1)]), 0)  # row 1's tail is never attended
    both = model(torch.stack([a[0, 8:], b[0, 4:]]), torch.tensor([8, 4]))[:, -1]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens(tiny_ckpt):
    kwargs = dict(max_seq_len=48, max_batch_size=2, device="cpu")
    plain = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), **kwargs)
    compiled = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), compile=True, **kwargs)
    assert compiled.model.compiled_step is not None
    prompts = [[1, 5, 9, 200, 31], [1, 77]]
    expected = plain.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    got = compiled.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    assert got[0] == expected[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_two_compiled_models_do_not_share_a_graph(tiny_ckpt):
    """Module guards are skipped for speed, so each model needs its own compiled step: a second
    model with another dtype and cache size must not run the first model's graph."""
    path, tok = str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model")
    first = Llama.build(path, tok, max_seq_len=48, max_batch_size=2, device="cpu", compile=True)
    first.generate([[1, 5]], max_gen_len=4, temperature=0)
    kwargs = dict(max_seq_len=40, max_batch_size=1, device="cpu", dtype="bf16")
    second = Llama.build(path, tok, compile=True, **kwargs)
    expected = Llama.build(path, tok, **kwargs).generate([[1, 5, 9]], max_gen_len=8, temperature=0, logprobs=True)
    got = second.generate([[1, 5, 9]], max_gen_len=8, temperature=0, logprobs=True)
    torch.testing.assert_close(torch.tensor(got[1][0][:2]), torch.tensor(expected[1][0][:2]), atol=0.05, rtol=0.05)
