"""The compiled decode step gives the eager path's tokens; rows at any positions and slots give each
sequence's own logits."""
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import random_model
from llama import Llama


def test_rows_at_their_own_positions_and_slots_equal_each_sequence_alone():
    model, _ = random_model()
    a = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(7))
    b = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(8))
    alone = [model(a, 0)[:, -1], model(b, 0)[:, -1]]
    slots = torch.tensor([3, 1])  # not the first rows of the cache, and not in order
    model(a[:, :8], 0, slots=slots[:1])
    model(b[:, :4], 0, slots=slots[1:])
    both = model(torch.stack([a[0, 8:], b[0, 4:]]), torch.tensor([8, 4]), slots=slots)[:, -1]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # Slot 0 still holds sequence b (the last run alone), which the slotted runs never touched.
    torch.testing.assert_close(model(b[:, 4:], 4)[:, -1], alone[1], atol=1e-5, rtol=1e-5)


def test_positions_as_an_int_as_row_starts_and_as_a_grid_agree():
    model, _ = random_model(n_kv_heads=2)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(10))
    model(tokens[:, :6], 0)
    shared = model(tokens[:, 6:10], 6)
    starts = model(tokens[:, 6:10], torch.tensor([6, 6]))
    grid = model(tokens[:, 6:10], torch.arange(6, 10).expand(2, 4))
    torch.testing.assert_close(starts, shared, atol=1e-5, rtol=1e-5)  # these read the whole cache, masked
    torch.testing.assert_close(grid, shared, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens(tiny_ckpt):
    kwargs = dict(max_seq_len=48, max_batch_size=3, device="cpu")
    plain = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), **kwargs)
    compiled = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), compile=True, **kwargs)
    assert compiled.model.compiled is not None
    for prompts in ([[1, 5, 9, 200, 31], [1, 77], [1, 3]], [[1, 5, 9]]):  # buckets of 3 rows and of 1
        expected = plain.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
        got = compiled.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
        assert got[0] == expected[0]
        torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_decode_reads_the_cache_in_growing_buckets(tiny_ckpt):
    """A compiled step reads 128 keys, then 256 or max_seq_len (here 200), as the furthest row grows past
    each: the tokens stay those of eager decoding, which reads exactly as many as it needs. compile_all
    compiles every bucket up front."""
    kwargs = dict(max_seq_len=200, max_batch_size=2, device="cpu")
    plain = Llama.build(str(tiny_ckpt), **kwargs)
    compiled = Llama.build(str(tiny_ckpt), compile=True, **kwargs)
    prompts = [[1] + [(7 * i) % 250 + 3 for i in range(118)], [1, 5, 9]]  # the first crosses 128 keys
    assert compiled.compile_all() == 4  # (1 or 2 rows) x (128 or 200 keys), before any request
    assert sorted(compiled.model.compiled.by_kv_len) == [128, 200]
    graphs = counters["stats"]["unique_graphs"]
    expected = plain.generate(prompts, max_gen_len=24, temperature=0, logprobs=True)
    got = compiled.generate(prompts, max_gen_len=24, temperature=0, logprobs=True)
    assert got[0] == expected[0]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(expected[1]), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing left to compile


@pytest.mark.slow
def test_two_compiled_models_do_not_share_a_graph(tiny_ckpt):
    """Module guards are skipped for speed, so each model needs its own compiled step: a second
    model with another dtype and cache size must not run the first model's graph."""
    path, tok = str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model")
    first = Llama.build(path, tok, max_seq_len=48, max_batch_size=1, device="cpu", compile=True)
    first.generate([[1, 5]], max_gen_len=4, temperature=0)
    kwargs = dict(max_seq_len=40, max_batch_size=1, device="cpu", dtype="bf16")
    second = Llama.build(path, tok, compile=True, **kwargs)
    expected = Llama.build(path, tok, **kwargs).generate([[1, 5, 9]], max_gen_len=8, temperature=0, logprobs=True)
    got = second.generate([[1, 5, 9]], max_gen_len=8, temperature=0, logprobs=True)
    torch.testing.assert_close(torch.tensor(got[1][0][:2]), torch.tensor(expected[1][0][:2]), atol=0.05, rtol=0.05)
