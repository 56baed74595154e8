"""Failures that one rank sees must stop every rank, quickly and with the same message."""
import pytest
import torch

from conftest import torchrun
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
    with pytest.raises(MemoryError, match=r"KV cache for max_batch_size=100000 x max_seq_len=100000 needs "
                                          r"[\d.]+ GiB on cpu but only [\d.]+ GiB is free"):
        Llama.build(str(tiny_ckpt), max_seq_len=100_000, max_batch_size=100_000)


def test_the_kv_cache_estimate_is_what_gets_allocated(tiny_ckpt):
    g = Llama.build(str(tiny_ckpt), max_seq_len=48, max_batch_size=3)
    allocated = sum(b.numel() * b.element_size() for name, b in g.model.named_buffers() if "cache" in name)
    assert allocated == kv_cache_bytes(g.model.params, 1, torch.float32)


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
