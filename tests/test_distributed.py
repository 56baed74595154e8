"""Two gloo processes from a 2-shard checkpoint against one process from the same weights unsharded."""
import re

import torch

import pytest

from conftest import logits, torchrun
from dist_worker import PROMPTS

pytestmark = pytest.mark.slow  # every test here starts processes


def test_two_processes_match_one(tiny_ckpt, tiny_ckpt2, tiny_llama, tmp_path):
    proc = torchrun(2, "tests/dist_worker.py", str(tiny_ckpt2), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.rank{r}.pt", weights_only=True) for r in range(2)]

    tokens = torch.tensor([tiny_llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    torch.testing.assert_close(ranks[0]["logits"], logits(tiny_llama.model, tokens), atol=1e-5, rtol=1e-5)
    assert ranks[0]["greedy"] == tiny_llama.text_completion(PROMPTS, temperature=0, max_gen_len=12)
    # every rank holds the same gathered logits and samples the same tokens
    assert ranks[1]["greedy"] == ranks[0]["greedy"] and ranks[1]["sampled"] == ranks[0]["sampled"]
    torch.testing.assert_close(ranks[1]["logits"], ranks[0]["logits"], atol=0, rtol=0)


def test_shard_count_mismatch_fails_on_every_rank_without_traceback(tiny_ckpt2):
    proc = torchrun(3, "example.py", "--ckpt_dir", str(tiny_ckpt2), timeout=120)  # 2 shards cannot spread over 3
    assert proc.returncode != 0
    assert proc.stderr.count("has 2 shard(s), which cannot be spread over 3 model-parallel") == 1  # rank 0 speaks
    assert "reshard it with scripts/reshard.py --num_shards 3" in proc.stderr
    # torchrun prints its own traceback when a child fails; none may come from our code
    assert not re.search(r'File ".*(example\.py|/llama/)', proc.stderr), proc.stderr


def test_example_py_on_two_processes(tiny_ckpt2):
    proc = torchrun(2, "example.py", "--ckpt_dir", str(tiny_ckpt2), "--prompts", "The cat, the dog", "A",
                    "--temperature", "0", "--max_gen_len", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("==================================") == 2  # printed once, by rank 0
    assert proc.stdout.startswith("The cat, the dog")
