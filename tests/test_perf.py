"""The compiled decode step gives the eager path's tokens; rows in any blocks at any positions give each
sequence's own logits."""
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import logits, random_model
from llama import Llama


def _paged(model, tokens, start, table):
    """A forward of `tokens` (B, T) from position `start` (one per row), row b's positions in the blocks of
    table[b] (a list per row, padded with block 0)."""
    B, T = tokens.shape
    bs = model.block_size
    positions = torch.tensor(start).view(B, 1) + torch.arange(T)
    tables = torch.tensor([t + [0] * (max(map(len, table)) - len(t)) for t in table])
    slots = tables.gather(1, positions // bs) * bs + positions % bs
    return model(tokens, positions, slots, tables)


def test_rows_in_scattered_blocks_at_their_own_positions_equal_each_sequence_alone():
    model, _ = random_model(max_seq_len=64)  # blocks of 16 positions
    a = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    b = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(8))
    alone = [logits(model, a)[:, -1], logits(model, b)[:, -1]]
    tables = [[9, 2, 14], [5, 11]]  # out of order, interleaved, not the blocks `logits` uses
    _paged(model, a[:, :39], [0], tables[:1])
    _paged(model, b[:, :20], [0], tables[1:])
    both = _paged(model, torch.stack([a[0, 39:], b[0, 20:]]), [39, 20], tables)[:, -1]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # A row whose table is padded with block 0 beyond its positions reads nothing of it.
    model.layers[0].attention.cache[0].fill_(1e4)
    torch.testing.assert_close(_paged(model, b[:, 20:], [20], [[5, 11, 0, 0]])[:, -1], alone[1], atol=1e-5, rtol=1e-5)


def test_a_chunk_after_cached_blocks_equals_the_whole_prompt_at_once():
    """A prefix's blocks, computed once, serve a later forward that starts at the block boundary (what the
    prefix cache does), for several rows sharing them."""
    model, _ = random_model(n_kv_heads=2)
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(10))
    whole = logits(model, tokens)
    _paged(model, tokens[:, :32], [0], [[3, 7]])  # the shared prefix: two full blocks
    rest = _paged(model, tokens[:, 32:].expand(2, 8), [32, 32], [[3, 7, 4], [3, 7, 6]])
    torch.testing.assert_close(rest, whole[:, 32:].expand(2, 8, -1), atol=1e-5, rtol=1e-5)


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
    # blocks of 16 positions: 128 and 200 keys, without adapters
    assert sorted(compiled.model.compiled.by_width) == [(8, False), (13, False)]
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
