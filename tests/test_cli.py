"""example.py and the scripts, run as a user runs them."""
import pytest

from conftest import run_python
from llama import Llama


def test_example_py_demo_runs_with_no_arguments():
    proc = run_python("example.py", "--max_gen_len", "6")
    assert proc.returncode == 0, proc.stderr
    assert "gibberish BY DESIGN" in proc.stderr
    assert proc.stdout.startswith("Once upon a time")


@pytest.mark.parametrize("args, message", [
    (["--ckpt_dir", "/nonexistent/ckpt"], "/nonexistent/ckpt' does not exist"),
    (["--temperature", "-1"], "temperature=-1"),
    (["--top_p", "0"], "top_p=0"),
    (["--max_batch_size", "1", "--prompts", "a", "b"], "2 prompts exceed max_batch_size=1"),
    (["--max_seq_len", "4", "--prompts", "one two three four five six"], "more than max_seq_len=4"),
    (["--device", "bogus"], "device='bogus' is not a device"),
    (["--device", "cuda:7"], "device='cuda:7' is not available"),
    (["--model_parallel_size", "2"], "model_parallel_size=2 does not divide the 1 process(es)"),
    (["--stop", "3"], "stop=3 must be"),
])
def test_example_py_bad_input_is_one_line_without_traceback(args, message):
    proc = run_python("example.py", *args)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_empty_ckpt_dir(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    proc = run_python("example.py", "--ckpt_dir", str(tmp_path))
    assert proc.returncode == 1 and "no consolidated.NN.pth shards" in proc.stderr


def test_make_tiny_checkpoint_script(tmp_path):
    out = tmp_path / "made"
    proc = run_python("scripts/make_tiny_checkpoint.py", str(out), "--num_shards", "2", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    g = Llama.build(str(out), max_seq_len=16, max_batch_size=1)  # 2 shards on one process
    assert g.model.tok_embeddings.weight.shape == (g.model.vocab_size, 64)
