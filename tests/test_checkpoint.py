"""Meta checkpoints of S shards on M processes (S % M == 0 or M % S == 0), resharding, and bad input."""
import argparse
import json
import logging
import re
import shutil

import pytest
import torch

from conftest import logits, resident_bytes, restart_peak_rss, run_python, torchrun
from dist_worker import PROMPTS
from llama import Llama, ModelArgs
from llama.checkpoint import (assemble, full_shapes, load_shard, release_pages, split_state_dict, write_checkpoint,
                              write_meta)
from llama.errors import CheckpointError
from llama.loading import open_checkpoint
from llama.tiny import TINY_PARAMS, random_state_dict, train_tokenizer
from llama.quantize import weight_bytes
from test_stories import PUBLISHED

PARAMS = {**TINY_PARAMS, "n_kv_heads": 4, "vocab_size": 256}  # every split dim divides by 4


def build(path, mp=1, **kwargs):
    return Llama.build(str(path), max_seq_len=16, max_batch_size=1, model_parallel_size=mp, **kwargs)


def native_and_written(tmp_path, num_shards: int, embedding_dim: int = 1):
    """A whole random state dict and a checkpoint of it in `num_shards` shards, the embedding cut along
    `embedding_dim` (0 is how Llama 3 checkpoints cut it)."""
    full = random_state_dict(ModelArgs.from_params(PARAMS), seed=1)
    shards = split_state_dict(full, num_shards)
    for shard, emb in zip(shards, full["tok_embeddings.weight"].chunk(num_shards, embedding_dim)):
        shard["tok_embeddings.weight"] = emb.clone()
    out = tmp_path / f"s{num_shards}e{embedding_dim}"
    out.mkdir()
    (out / "params.json").write_text(json.dumps(PARAMS))
    for i, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
    return full, out


@pytest.mark.parametrize("shards, ranks", [(2, 1), (4, 1), (1, 2), (4, 2), (2, 4), (1, 4)])
@pytest.mark.parametrize("embedding_dim", [1, 0])
@pytest.mark.parametrize("block_numel", [None, 50])  # 50: tensors are copied a row or a few at a time
def test_rank_slices_equal_the_native_split(tmp_path, monkeypatch, shards, ranks, embedding_dim, block_numel):
    if block_numel is not None:
        monkeypatch.setattr("llama.checkpoint._BLOCK_NUMEL", block_numel)
    full, path = native_and_written(tmp_path, shards, embedding_dim)
    ckpt = open_checkpoint(path, ranks)
    assert ckpt.embedding_dim == (embedding_dim if shards > 1 else 1)
    for rank, expected in enumerate(split_state_dict(full, ranks)):  # the model's split: embedding along dim 1
        got = dict(ckpt.rank_tensors(rank, ranks, dtype=torch.bfloat16))
        assert list(got) == list(expected)
        for name, t in got.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, expected[name].bfloat16()), name


def test_reshard_keeps_a_llama3_embedding_split(tmp_path):
    full, path = native_and_written(tmp_path, 2, embedding_dim=0)
    write_meta(open_checkpoint(path, 4), tmp_path / "out", 4)
    for i, emb in enumerate(full["tok_embeddings.weight"].chunk(4, 0)):
        assert torch.equal(load_shard(tmp_path / "out" / f"consolidated.{i:02d}.pth")["tok_embeddings.weight"], emb)


def test_released_pages_still_read_back(tmp_path):
    torch.save({"w": torch.arange(300_000.0)}, tmp_path / "w.pth")
    t = load_shard(tmp_path / "w.pth")["w"]
    copy = t.clone()
    release_pages(t)  # the file pages are dropped, not the data
    assert torch.equal(t, copy)


def test_loading_holds_one_copy_of_the_weights(tmp_path, tiny_ckpt):
    """Peak resident memory of Llama.build over the weights it loads, for a bf16 checkpoint whose
    largest tensor (the output matrix, 134 MB) is half of it. Holding that tensor's file pages
    until it is copied, or checking it for NaN with full-size temporaries, would make it 1.5 or more."""
    params = {"dim": 256, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 262144, "multiple_of": 256}
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.rand(shape, generator=gen, dtype=torch.bfloat16)
             for name, shape in full_shapes(ModelArgs.from_params(params)).items()}
    write_checkpoint(tmp_path / "ckpt", params, state, tokenizer_path=tiny_ckpt / "tokenizer.model")
    del state
    before = restart_peak_rss()
    model = build(tmp_path / "ckpt", device="cpu", dtype="bf16").model
    ratio = (resident_bytes("VmHWM") - before) / weight_bytes(model)  # the output matrix packed for fbgemm too
    assert ratio < 1.1


def test_two_shards_on_one_process_match_native(tiny_ckpt2, tiny_llama):
    g = Llama.build(str(tiny_ckpt2), max_seq_len=64, max_batch_size=4, model_parallel_size=1, device="cpu")
    tokens = torch.tensor([g.tokenizer.encode(PROMPTS[2], bos=True, eos=False)])
    torch.testing.assert_close(logits(g.model, tokens), logits(tiny_llama.model, tokens), atol=1e-5, rtol=1e-5)
    assert g.text_completion(PROMPTS, temperature=0, max_gen_len=12) == \
        tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=12)


def test_rank_0_logs_shards_bytes_and_seconds(tiny_ckpt2, caplog):
    with caplog.at_level(logging.INFO, logger="llama.checkpoint"):
        build(tiny_ckpt2)
    assert re.fullmatch(rf"rank 0 of 1: 2 of 2 shard\(s\) of {tiny_ckpt2}: 0\.00 GB in \d+\.\d s", caplog.messages[-1])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llama.checkpoint"):
        dict(open_checkpoint(tiny_ckpt2, 2).rank_tensors(1, 2, log_progress=False))
    assert not caplog.messages


@pytest.mark.slow
def test_one_shard_on_two_processes_matches_native(tiny_ckpt, tiny_llama, tmp_path):
    proc = torchrun(2, "tests/dist_worker.py", str(tiny_ckpt), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.rank{r}.pt", weights_only=True) for r in range(2)]
    tokens = torch.tensor([tiny_llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    for r in ranks:
        torch.testing.assert_close(r["logits"], logits(tiny_llama.model, tokens), atol=1e-5, rtol=1e-5)
        assert r["greedy"] == tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=12)


@pytest.mark.slow
def test_stories260k_on_two_processes_reproduces_one(stories_ckpt):
    g = Llama.build(str(stories_ckpt), max_seq_len=256, max_batch_size=1, model_parallel_size=1)
    prompt = "Once upon a time,"
    alone = prompt + g.text_completion([prompt], temperature=0, max_gen_len=40)[0]["generation"]
    assert alone.startswith(PUBLISHED)
    proc = torchrun(2, "example.py", "--ckpt_dir", str(stories_ckpt), "--prompts", prompt,
                    "--temperature", "0", "--max_gen_len", "40", "--max_seq_len", "256")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n\n==========")[0] == alone


@pytest.mark.slow
def test_reshard_script_merges_and_copies(tiny_ckpt, tiny_ckpt2, tmp_path):
    out = tmp_path / "merged"
    proc = run_python("scripts/reshard.py", str(tiny_ckpt2), str(out), "--num_shards", "1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    for name in ("params.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (tiny_ckpt2 / name).read_bytes()
    got, expected = load_shard(out / "consolidated.00.pth"), load_shard(tiny_ckpt / "consolidated.00.pth")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    bad = run_python("scripts/reshard.py", str(tiny_ckpt2), str(tmp_path / "three"), "--num_shards", "3")
    assert bad.returncode == 1 and "cannot be spread over 3" in bad.stderr and "Traceback" not in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # nothing half-written


def test_a_failed_write_leaves_no_folder(tiny_ckpt2, tmp_path, monkeypatch):
    saved, real_save = [], torch.save

    def save_then_fail(obj, path):
        saved.append(path)
        if len(saved) == 2:
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_meta(open_checkpoint(tiny_ckpt2, 2), tmp_path / "out", 2)
    assert len(saved) == 2 and list(tmp_path.iterdir()) == []


# Bad input: each raised by validation, which every rank runs before any collective call.

def edited_copy(src, dst, params=None, shard=None, edit=None):
    """Copy checkpoint `src` to `dst`, update params.json with `params`, and apply `edit` to shard `shard`."""
    shutil.copytree(src, dst)
    if params is not None:
        (dst / "params.json").write_text(json.dumps({**json.loads((dst / "params.json").read_text()), **params}))
    if edit is not None:
        path = dst / f"consolidated.{shard:02d}.pth"
        sd = torch.load(path, weights_only=True)
        edit(sd)
        torch.save(sd, path)
    return dst


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[80:120] = b"\xff" * 40  # inside the pickled metadata, which comes first
    path.write_bytes(bytes(data))


def edit_file(name, change):
    def make(src, dst):
        change(edited_copy(src, dst) / name)
        return dst
    return make


def edit_params(**params):
    return lambda src, dst: edited_copy(src, dst, params=params)


def edit_shard(shard, edit):
    return lambda src, dst: edited_copy(src, dst, shard=shard, edit=edit)


def grow_wq(sd):
    sd["layers.1.attention.wq.weight"] = torch.ones(40, 64)  # 32 rows in the other shard


def unchanged(src, dst):
    return edited_copy(src, dst)


BAD = {  # how to break a copy of a 2-shard checkpoint, processes, the error
    "empty folder": (lambda src, dst: dst.mkdir() or dst, 1, "holds neither a Meta checkpoint"),
    "no params.json": (edit_file("params.json", lambda p: p.unlink()), 1, "params.json is missing"),
    "params not JSON": (edit_file("params.json", lambda p: p.write_text("{dim: 64")), 1, "is not valid JSON"),
    "dim % n_heads": (edit_params(n_heads=5), 1, "dim=64 is not divisible by n_heads=5"),
    "n_heads % n_kv_heads": (edit_params(n_kv_heads=3), 1, "n_heads=4 is not divisible by n_kv_heads=3"),
    "3 processes for 2 shards": (unchanged, 3, "has 2 shard(s), which cannot be spread over 3"),
    "more processes than kv heads": (unchanged, 4, "n_kv_heads=2 cannot be split over 4"),
    "shapes vs params.json": (edit_params(multiple_of=256), 1, "feed_forward.w1.weight has shape (96, 64) but "
                              "params.json and 2 shard(s) imply (128, 64)"),
    "shapes vs other shard": (edit_shard(1, grow_wq), 1,
                              "consolidated.01.pth: layers.1.attention.wq.weight has shape (40, 64)"),
    "missing tensor": (edit_shard(0, lambda sd: sd.pop("norm.weight")), 1, "missing: ['norm.weight']"),
    "unexpected tensor": (edit_shard(1, lambda sd: sd.update({"extra.weight": torch.zeros(1)})), 1,
                          "unexpected: ['extra.weight']"),
    "truncated": (edit_file("consolidated.01.pth", truncate), 1, "truncated or corrupted"),
    "corrupted": (edit_file("consolidated.00.pth", corrupt), 1, "truncated or corrupted"),
    "not weights only": (edit_shard(1, lambda sd: sd.update({"x": argparse.Namespace()})), 1,
                         "weights_only loading refused it (WeightsUnpickler error: Unsupported global: GLOBAL "
                         "argparse.Namespace was not an allowed global by default)"),
    # Issue 18, item 5: 155 bytes of params.json once grew RSS past 7 GB listing a billion layers' names.
    "n_layers 10**9": (edit_params(n_layers=10**9), 1, "params.json: n_layers=1000000000 must be an integer from 1 "
                       "to 1024 (the bounds on what a real LLaMA model has)"),
    "dim 10**7": (edit_params(dim=10**7), 1, "dim=10000000 must be an integer from 1 to 65536"),
    "vocab_size 10**9": (edit_params(vocab_size=10**9), 1, "vocab_size=1000000000 must be an integer from 1 to"),
    "n_layers vs shard": (edit_params(n_layers=1000), 1, "consolidated.00.pth holds 2 layers but params.json says "
                          "n_layers=1000"),
    "hidden dim": (edit_params(ffn_dim_multiplier=1e6), 1, "the feed-forward width 170000000 (from dim, multiple_of "
                   "and ffn_dim_multiplier) exceeds 262144"),
    # Issue 18, item 8: a NaN rope_theta made every request fail with a misleading overflow error.
    "rope_theta NaN": (edit_params(rope_theta=float("nan")), 1, "rope_theta=nan must be a finite number above 0"),
    "rope_theta inf": (edit_params(rope_theta=float("inf")), 1, "rope_theta=inf must be a finite number above 0"),
    "rope_theta 0": (edit_params(rope_theta=0), 1, "rope_theta=0 must be a finite number above 0"),
    "rope_theta < 0": (edit_params(rope_theta=-10000.0), 1, "rope_theta=-10000.0 must be a finite number above 0"),
    "norm_eps NaN": (edit_params(norm_eps=float("nan")), 1, "norm_eps=nan must be a finite number above 0"),
    "rope factors": (edit_params(use_scaled_rope=True, rope_low_freq_factor=4.0, rope_high_freq_factor=4.0), 1,
                     "rope_high_freq_factor=4.0 must exceed rope_low_freq_factor=4.0"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_is_refused_before_any_collective(tiny_ckpt2, tmp_path, case):
    make, mp, message = BAD[case]
    path = make(tiny_ckpt2, tmp_path / "bad")
    with pytest.raises(CheckpointError) as err:
        # One process cannot start a model-parallel group of mp > 1: check what each of its ranks would.
        build(path, mp=mp) if mp == 1 else open_checkpoint(path, mp)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_max_seq_len_and_max_batch_size_are_bounded(tiny_ckpt):
    with pytest.raises(ValueError, match=r"max_seq_len=8388608 must be an integer from 1 to 4194304 \(the bounds on "
                                         r"what a real LLaMA model has\): pass a value in range"):
        Llama.build(str(tiny_ckpt), max_seq_len=1 << 23, max_batch_size=1)
    with pytest.raises(ValueError, match="max_batch_size=2000000 must be an integer from 1 to 1048576"):
        Llama.build(str(tiny_ckpt), max_seq_len=16, max_batch_size=2_000_000)


def zero_stride_checkpoint(path, params):
    """A checkpoint whose every tensor has the shape params.json implies but stores one element (zero strides):
    a few kilobytes on disk that claim the whole model."""
    path.mkdir()
    (path / "params.json").write_text(json.dumps(params))
    shapes = full_shapes(ModelArgs.from_params(params))
    torch.save({name: torch.zeros(()).expand(shape) for name, shape in shapes.items()}, path / "consolidated.00.pth")
    return path


BIG = {"dim": 8192, "n_layers": 32, "n_heads": 64, "vocab_size": 32000, "multiple_of": 256, "norm_eps": 1e-5}


def test_a_shard_of_zero_stride_tensors_is_refused_before_allocating(tmp_path):
    """Issue 18, item 6: a 39 KB shard claiming 103 GiB once made every CLI allocate the whole model."""
    path = zero_stride_checkpoint(tmp_path / "zero", BIG)
    assert (path / "consolidated.00.pth").stat().st_size < 200_000
    before = resident_bytes("VmRSS")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: tok_embeddings.weight of shape \(32000, 8192\) "
                       r"claims 1048576000 bytes but the file stores 4 for it \(repeated or missing elements\)"):
        open_checkpoint(path)
    assert resident_bytes("VmRSS") - before < 200 << 20


def test_weights_that_do_not_fit_in_memory_are_refused_before_allocating(tiny_ckpt, monkeypatch):
    """Issue 18, item 6: as the KV cache is checked against the memory left, so are the weights, first."""
    monkeypatch.setattr("llama.loading.available_memory", lambda device: 100_000)
    with pytest.raises(MemoryError, match=r"the weights of .*tiny1 need 0.00 GiB on cpu \(this rank's share, in "
                       r"float32\) but only 0.00 GiB is free: use more model-parallel processes"):
        build(tiny_ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["example.py", "chat.py", "serve.py"])
def test_the_clis_refuse_a_zero_stride_shard_in_one_line(tmp_path, cli):
    path = zero_stride_checkpoint(tmp_path / "zero", BIG)
    extra = ["--nopage", "--port", "0"] if cli == "serve.py" else []
    proc = run_python(cli, "--ckpt_dir", str(path), *extra, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "claims 1048576000 bytes" in proc.stderr


def test_tokenizer_larger_than_the_model_is_refused(tiny_ckpt, tmp_path):
    tok = train_tokenizer(tmp_path / "big.model", vocab_size=700)
    with pytest.raises(CheckpointError, match="has 700 tokens but the model's vocab_size is 512"):
        build(tiny_ckpt, tokenizer_path=str(tok))


@pytest.mark.slow
def test_corrupt_shard_fails_on_every_rank(tiny_ckpt2, tmp_path):
    """Rank 0 never reads shard 01's weights, but still refuses it instead of waiting on rank 1."""
    bad = edit_file("consolidated.01.pth", truncate)(tiny_ckpt2, tmp_path / "bad")
    proc = torchrun(2, "tests/dist_worker.py", str(bad), str(tmp_path / "out"))
    assert proc.returncode != 0
    assert proc.stderr.count("consolidated.01.pth could not be read") == 2, proc.stderr[-3000:]


def test_vocab_size_minus_one_is_read_from_the_shards(tiny_ckpt2, tmp_path):
    """Llama 1's params.json says vocab_size -1."""
    path = edited_copy(tiny_ckpt2, tmp_path / "llama1", params={"vocab_size": -1})
    assert open_checkpoint(path).args.vocab_size == 512


def test_assemble_copies_a_scalar():
    assert assemble([], [([], torch.tensor(3.0))], None, "cpu").item() == 3.0
