"""Failures that one rank sees must stop every rank, quickly and with the same message."""
import pytest

from conftest import torchrun


@pytest.mark.parametrize("kind, expected", [
    ("value", "ValueError: rank 1: shard consolidated.01.pth is unreadable"),
    ("internal", "RankError: rank 1: KeyError: 'something internal'"),
])
def test_an_error_on_one_rank_is_raised_on_every_rank(kind, expected):
    proc = torchrun(2, "tests/fail_worker.py", kind, timeout=60)
    assert proc.returncode != 0
    assert f"rank 0 raised {expected}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "rank 1 raised" in proc.stdout
