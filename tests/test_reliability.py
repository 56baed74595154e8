"""Failures that one rank sees must stop every rank, quickly and with the same message."""
import pytest
import torch

from conftest import torchrun
import llama.loading
from llama import Llama
from llama.loading import kv_cache_bytes


@pytest.mark.parametrize("kind, expected", [
    ("value", "ValueError: rank 1: shard consolidated.01.pth is unreadable"),
    ("internal", "RankError: rank 1: KeyError: 'something internal'"),
])
@pytest.mark.slow
def test_an_error_on_one_rank_is_raised_on_every_rank(kind, expected):
    proc = torchrun(2, "tests/fail_worker.py", kind, timeout=60)
    assert proc.returncode != 0
    assert f"rank 0 raised {expected}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "rank 1 raised" in proc.stdout


def test_a_kv_cache_too_large_for_memory_is_refused_at_build(tiny_ckpt):
    with pytest.raises(MemoryError, match=r"KV cache for 100000000000 positions needs 47683.72 GiB on cpu but only "
                                          r"[\d.]+ GiB is free after loading the weights: lower kv_cache_tokens"):
        Llama.build(str(tiny_ckpt), max_seq_len=64, max_batch_size=4, kv_cache_tokens=10**11)
    with pytest.raises(ValueError, match="kv_cache_tokens=32 is less than max_seq_len=64"):
        Llama.build(str(tiny_ckpt), max_seq_len=64, max_batch_size=4, kv_cache_tokens=32)


def test_by_default_the_kv_cache_is_capped_by_the_memory_left(tiny_ckpt, caplog, monkeypatch):
    """max_batch_size x max_seq_len positions by default, or as many as memory holds: requests beyond wait."""
    monkeypatch.setattr(llama.loading, "available_memory", lambda device: 2**22)  # 4 MiB free after the weights
    # keys and values of 2 layers x 2 kv heads x 16 floats: 512 bytes a position, 7372 in 90% of 4 MiB
    with caplog.at_level("WARNING"):
        g = Llama.build(str(tiny_ckpt), max_seq_len=1024, max_batch_size=64)
    assert "the KV cache gets 7372 positions, the most that fit on cpu" in caplog.text
    assert g.engine.kv_cache_tokens == 7376  # in whole blocks of 16
    assert Llama.build(str(tiny_ckpt), max_seq_len=4096, max_batch_size=64).engine.kv_cache_tokens == 7376
    with pytest.raises(MemoryError, match=r"the KV cache for 8192 positions needs 4.0 MiB on cpu but only 4.0 MiB is "
                                          r"free after loading the weights: lower max_seq_len"):
        Llama.build(str(tiny_ckpt), max_seq_len=8192, max_batch_size=64)  # never less than one whole sequence


def test_the_kv_cache_estimate_is_what_gets_allocated(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), max_seq_len=48, max_batch_size=3)
    assert g.engine.kv_cache_tokens == 3 * 48  # the default: max_batch_size x max_seq_len (3 blocks of 16 each)
    allocated = sum(b.numel() * b.element_size() for name, b in g.model.named_buffers() if name.endswith(".cache"))
    # and the padding block
    assert allocated == kv_cache_bytes(g.model.params, 1, torch.float32, 3 * 48 + 16)


@pytest.mark.slow
def test_bad_build_input_fails_on_both_ranks(tiny_ckpt2):
    """A shard only rank 1 reads holds inf: both ranks stop, rank 0 printing rank 1's error once."""
    import shutil
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "ckpt"
        shutil.copytree(tiny_ckpt2, bad)
        sd = torch.load(bad / "consolidated.01.pth", weights_only=True)
        sd["norm.weight"] = torch.full_like(sd["norm.weight"], float("inf"))
        torch.save(sd, bad / "consolidated.01.pth")
        proc = torchrun(2, "example.py", "--ckpt_dir", str(bad), timeout=90)
    assert proc.returncode != 0
    assert proc.stderr.count("norm.weight holds NaN or inf") == 1, proc.stderr[-2000:]
    assert "error: rank 1:" in proc.stderr


@pytest.mark.parametrize("case, message", [
    ("different", "rank 1 was given different prompts or sampling arguments than rank 0"),
    ("too long", "rank 1: prompt 0 has"),
])
@pytest.mark.slow
def test_a_prompt_only_one_rank_got_stops_both(tiny_ckpt2, case, message):
    proc = torchrun(2, "tests/mismatch_worker.py", str(tiny_ckpt2), case, timeout=90)
    assert proc.returncode != 0
    assert f"rank 0 raised: {message}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "rank 1 raised" in proc.stdout


@pytest.mark.slow
def test_a_rank_that_crashes_mid_generation_ends_the_job(tiny_ckpt2):
    """Rank 0 is then blocked in a collective; the job still ends, in seconds, with rank 1's error."""
    proc = torchrun(2, "tests/mismatch_worker.py", str(tiny_ckpt2), "crash", timeout=60)  # a hang fails here
    assert proc.returncode != 0
    assert "simulated out of memory on rank 1" in proc.stderr
