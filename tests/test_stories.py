"""The real stories260K model (llama2.c) must reproduce its published greedy sample."""
from llama import Llama
from conftest import run_python

PUBLISHED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def test_stories260k_greedy_sample(stories_ckpt):
    g = Llama.build(str(stories_ckpt), str(stories_ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=1)
    tokens, _ = g.generate([[g.tokenizer.bos_id]], max_gen_len=40, temperature=0)
    assert g.tokenizer.decode(tokens[0]).startswith(PUBLISHED)


def test_stories260k_through_example_py(stories_ckpt):
    proc = run_python("example.py", "--ckpt_dir", str(stories_ckpt), "--prompts", "Once upon a time,",
                      "--temperature", "0", "--max_gen_len", "30")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PUBLISHED)
