"""scripts/benchmark.py in its smoke mode: the tiny shape against transformers, a few tokens."""
import json

import pytest

from conftest import run_python

pytestmark = pytest.mark.slow  # every test here starts processes


def test_benchmark_smoke(tmp_path):
    proc = run_python("scripts/benchmark.py", "--smoke", "--json", "--cache_dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert "round 1/1 hf" in proc.stderr  # progress goes to stderr, only the report to stdout
    assert (tmp_path / "tiny-float32" / "consolidated.00.pth").is_file()  # the cached random weights
    load = report["load"]
    assert load["load_s"] > 0 and load["weight_bytes"] > 0 and load["load_peak_rss_growth"] > 0
    assert [row["batch"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["same_tokens"], "greedy tokens differ from transformers on the same weights"
        for impl in ("ours", "hf"):
            assert row[impl]["decode_tok_s_total"] > 0 and row[impl]["ttft_s"] > 0
        assert row["ratio"]["decode_tok_s_total"]["min"] > 0


def test_benchmark_bad_flags(tmp_path):
    proc = run_python("scripts/benchmark.py", "--shape", "gpt5", "--cache_dir", str(tmp_path))
    assert proc.returncode == 1 and "gpt5" in proc.stderr and "tinyllama-1.1b" in proc.stderr
    proc = run_python("scripts/benchmark.py")
    assert proc.returncode == 1 and "--ckpt_dir" in proc.stderr



def test_benchmark_times_several_quantize_modes_in_one_run(tmp_path):
    """--quantize none,int4: each mode loads in its own probe and decodes in alternating rounds, and every
    pair gets a ratio taken round by round."""
    proc = run_python("scripts/benchmark.py", "--shape", "tiny", "--quantize", "none,int4", "--batch", "1",
                      "--prompt_len", "4", "--gen_len", "2", "--rounds", "1", "--json", "--cache_dir", str(tmp_path),
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["config"]["quantize"] == "none,int4" and list(report["loads"]) == ["none", "int4"]
    assert report["loads"]["int4"]["weight_bytes"] < 0.5 * report["loads"]["none"]["weight_bytes"]
    (row,) = report["results"]
    assert row["ours:none"]["decode_tok_s_total"] > 0 and row["ours:int4"]["decode_tok_s_total"] > 0
    assert list(row["ratios"]) == ["ours:none/ours:int4"]
    assert row["ratios"]["ours:none/ours:int4"]["decode_tok_s_total"]["min"] > 0


def test_compare_llamacpp_names_what_is_missing(tmp_path):
    """--compare llamacpp checks the llama.cpp build before loading anything: a folder without its
    tools, or a batch other than 1, is a clear error; a build folder's CMakeCache.txt leads to the
    sources whose convert_hf_to_gguf.py makes the GGUF files."""
    proc = run_python("scripts/benchmark.py", "--shape", "tiny", "--compare", "llamacpp", "--llamacpp", str(tmp_path),
                      "--cache_dir", str(tmp_path))
    assert proc.returncode == 1 and "lacks llama.cpp's llama-bench, llama-quantize" in proc.stderr
    proc = run_python("scripts/benchmark.py", "--shape", "tiny", "--compare", "llamacpp", "--batch", "1,8",
                      "--cache_dir", str(tmp_path))
    assert proc.returncode == 1 and "batch 1" in proc.stderr

    from conftest import script

    build, src = tmp_path / "build", tmp_path / "src"
    (build / "bin").mkdir(parents=True)
    src.mkdir()
    for tool in ("llama-bench", "llama-quantize", "llama-simple", "llama-server"):
        (build / "bin" / tool).write_text("")
    (build / "CMakeCache.txt").write_text(f"FOO:BOOL=ON\nCMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    llamacpp = script("llamacpp")
    try:
        llamacpp.LlamaCpp(str(build))
        raise AssertionError("a source folder without convert_hf_to_gguf.py was taken")
    except FileNotFoundError as e:
        assert "convert_hf_to_gguf.py" in str(e)
    (src / "convert_hf_to_gguf.py").write_text("")
    found = llamacpp.LlamaCpp(str(build))  # the build folder itself, or its bin/
    assert found.bin == build / "bin" and found.src == src
    assert llamacpp.LlamaCpp(str(build / "bin"), str(src)).src == src
