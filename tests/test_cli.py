"""The command lines (llama.cli): flags checked before anything loads, --help, errors that name flags, notes.

Most checks run in this process (`cli.run(main, argv)`); the few marked slow run the commands as a user does.
"""
import json

import pytest

from conftest import ROOT, run_python, script
from llama import Llama, cli
from llama.commands import chat, generate, serve
from llama import download

SCRIPTS = ["benchmark", "convert_checkpoint", "convert_llama2c", "download", "load_test", "make_tiny_checkpoint",
           "merge_lora", "quantize", "reshard"]
COMMANDS = {"generate": generate.main, "chat": chat.main, "serve": serve.main, "download": download.main}


@pytest.fixture
def no_loading(monkeypatch):
    """Llama.build and the server fail the test if a command reaches them."""
    def refuse(*a, **k):
        raise AssertionError("the command loaded a model before refusing its command line")
    monkeypatch.setattr(Llama, "build", refuse)
    monkeypatch.setattr("llama.serve.server.serve_rank0", refuse)


def _main_of(name):
    return COMMANDS[name] if name in COMMANDS else script(name).main


@pytest.mark.parametrize("name, argv, message", [
    ("generate", ["--ckpt_dirr", "/x"], "unknown flag --ckpt_dirr: did you mean --ckpt_dir?"),
    ("generate", ["--temprature", "0"], "did you mean --temperature?"),
    ("generate", ["--max_seq_len", "abc"], "--max_seq_len expects an integer, got 'abc'"),
    ("generate", ["--top_p", "high"], "--top_p expects a number, got 'high'"),
    ("generate", ["--stream=maybe"], "--stream is a switch"),
    ("generate", ["--prompts"], "--prompts needs at least one value"),
    ("generate", ["--ckpt_dir"], "--ckpt_dir needs a value"),
    ("generate", ["/some/dir"], "unexpected argument '/some/dir'"),
    ("generate", ["-c", "/x"], "unknown flag -c"),
    ("generate", ["--seed", "1", "--seed", "2"], "--seed is given twice"),
    ("chat", ["--sytem", "hi"], "did you mean --system?"),
    ("serve", ["--ckpt_dirr", "/x"], "did you mean --ckpt_dir?"),
    ("serve", ["--modle", "tiny=/x"], "unknown flag --modle: did you mean --model?"),
    ("serve", ["--model"], "--model needs at least one value"),
    ("serve", ["--no-page"], "unknown flag --no-page: did you mean --nopage?"),
    ("download", ["stories260K", "--dirr", "/x"], "did you mean --dir?"),
    ("download", [], "missing REPO"),
    ("convert_llama2c", ["a.bin", "tok.model"], "missing OUT_DIR"),
    ("convert_llama2c", ["a.bin", "tok.model", "out", "extra"], "unexpected argument 'extra'"),
    ("quantize", ["in", "out", "--mdoe", "int4"], "did you mean --mode?"),
    ("reshard", ["in", "out", "--num_shards", "two"], "--num_shards expects an integer"),
    ("merge_lora", ["base", "adapter", "out", "--too", "hf"], "did you mean --to?"),
    ("convert_checkpoint", ["in", "out", "--to", "hf", "--chat-formt", "x"], "did you mean --chat_format?"),
    ("make_tiny_checkpoint", ["out", "--num_shard", "2"], "did you mean --num_shards?"),
    ("benchmark", ["--shapes", "tiny"], "did you mean --shape?"),
    ("load_test", ["--client", "4"], "did you mean --clients?"),
])
def test_a_bad_command_line_is_refused_with_status_2_before_anything_loads(name, argv, message, no_loading, capsys):
    assert cli.run(_main_of(name), argv, prog=name) == 2
    err = capsys.readouterr().err
    assert err == f"{name}: error: {err.split(': error: ', 1)[1]}" and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", list(COMMANDS) + SCRIPTS)
def test_help_describes_every_flag(name, capsys):
    main = _main_of(name)
    assert cli.run(main, ["--help"], prog=name) == 0
    out = capsys.readouterr().out
    flags = cli.flags_of(main)
    for flag in flags.values():
        assert f"--{flag.name}" in out
    if name in COMMANDS or name not in ("benchmark", "load_test"):  # those two document their flags in their module
        missing = [f.name for f in flags.values() if not f.help]
        assert not missing, f"{name}: flags without a description: {missing}"
    assert "Optional[" not in out and "typing." not in out


def test_values_arrive_as_typed():
    flags = cli.flags_of(serve.main)
    got = cli.parse_argv(flags, ["--api_key", "Secr3t#tail", "--model_name=0x1F", "--port", "8001", "--nopage",
                                 "--stream_interval", "0", "--max_seq_len=256"])
    assert got == {"api_key": "Secr3t#tail", "model_name": "0x1F", "port": 8001, "page": False,
                   "stream_interval": 0, "max_seq_len": 256}
    flags = cli.flags_of(generate.main)
    got = cli.parse_argv(flags, ["--prompts", "a, b", "c", "-1 is", "--stop", "3", "--temperature", "-0.5", "--stream"])
    assert got == {"prompts": ["a, b", "c", "-1 is"], "stop": "3", "temperature": -0.5, "stream": True}
    assert cli.parse_argv(flags, ["--stop", '["\\n", "THE END"]'])["stop"] == ["\n", "THE END"]
    assert cli.parse_argv(flags, ["--stop", "[not json"])["stop"] == "[not json"
    assert cli.parse_argv(flags, ["--prompts=--x"])["prompts"] == ["--x"]
    assert cli.parse_argv(flags, ["--stream=false", "--compile=True"]) == {"stream": False, "compile": True}
    bench = cli.flags_of(script("benchmark").main)  # unannotated flags read as fire reads them
    assert cli.parse_argv(bench, ["--batch", "1,8", "--quantize", "none,int4"]) == {
        "batch": (1, 8), "quantize": "none,int4"}


def test_errors_name_flags_not_python_arguments():
    flags = cli.flags_of(generate.main)
    message = "prompt 0 has 15 tokens, more than max_seq_len=4: shorten it or raise max_seq_len"
    assert cli.flag_names(message, flags) == \
        "prompt 0 has 15 tokens, more than --max_seq_len=4: shorten it or raise --max_seq_len"
    assert cli.flag_names("device='bogus' is not a device", flags) == "--device='bogus' is not a device"
    assert cli.flag_names("no file /tmp/top_p/x; --top_p=2", flags) == "no file /tmp/top_p/x; --top_p=2"


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature=-1 must be"),
    (["--top_p", "0"], "--top_p=0"),
    (["--max_batch_size", "1", "--prompts", "a", "b"], "2 prompts exceed --max_batch_size=1"),
    (["--max_seq_len", "4", "--prompts", "one two three four five six"], "more than --max_seq_len=4"),
    (["--device", "bogus"], "--device='bogus' is not a device"),
    (["--device", "cuda:7"], "--device='cuda:7' is not available"),
    (["--model_parallel_size", "2"], "--model_parallel_size=2 does not divide the 1 process(es)"),
    (["--dtype", "fp8"], "--dtype='fp8' is not one of"),
    (["--repetition_penalty", "0"], "--repetition_penalty=0 must be a number > 0"),
    (["--presence_penalty", "3"], "--presence_penalty=3 must be a number in [-2.0, 2.0]"),
    (["--min_p", "2"], "--min_p=2 must be a number in [0.0, 1.0]"),
])
def test_bad_input_is_one_line_naming_the_flag_and_status_1(tiny_ckpt, argv, message, capsys):
    assert cli.run(generate.main, ["--ckpt_dir", str(tiny_ckpt), *argv], prog="llama-generate") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert cli.run(generate.main, ["--ckpt_dir", str(tmp_path / "nowhere")]) == 1
    assert "nowhere' does not exist" in capsys.readouterr().err
    (tmp_path / "params.json").write_text("{}")
    assert cli.run(generate.main, ["--ckpt_dir", str(tmp_path)]) == 1
    assert "no consolidated.NN.pth shards" in capsys.readouterr().err


def test_an_answer_cut_by_max_seq_len_gets_a_note(tiny_ckpt, capsys):
    argv = ["--ckpt_dir", str(tiny_ckpt), "--prompts", "The cat", "--max_seq_len", "16", "--max_gen_len", "50",
            "--temperature", "0"]
    assert cli.run(generate.main, argv) == 0
    captured = capsys.readouterr()
    g = Llama.build(str(tiny_ckpt), max_seq_len=16, max_batch_size=1)
    room = 16 - len(g.tokenizer.encode("The cat", bos=True, eos=False))
    assert f"note: --max_gen_len=50 does not fit in --max_seq_len=16 after the longest prompt: answers stop " \
           f"after {room} new tokens; pass a larger --max_seq_len" in captured.err
    tokens, _ = g.generate([g.tokenizer.encode("The cat", bos=True, eos=False)], max_gen_len=50, temperature=0)
    assert len(tokens[0]) == room or g.tokenizer.eos_id in tokens[0]
    assert captured.out.startswith("The cat" + g.text_completion(["The cat"], temperature=0, max_gen_len=50)[0][
        "generation"])
    assert cli.run(generate.main, argv[:-4] + ["--max_gen_len", "4"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_max_seq_len_defaults_to_the_checkpoints_context(tiny_ckpt, tmp_path):
    params = json.loads((tiny_ckpt / "params.json").read_text())
    assert "max_seq_len" not in params
    assert Llama.build(str(tiny_ckpt), max_batch_size=1).max_seq_len == 2048  # stated nowhere: the documented default
    import shutil

    stated = tmp_path / "stated"
    shutil.copytree(tiny_ckpt, stated)
    (stated / "params.json").write_text(json.dumps({**params, "max_seq_len": 96}))
    assert Llama.build(str(stated), max_batch_size=1).max_seq_len == 96
    assert Llama.build(str(stated), max_seq_len=40, max_batch_size=1).max_seq_len == 40


def test_chat_refuses_max_gen_len_beyond_the_context(tiny_ckpt, capsys):
    assert cli.run(chat.main, ["--ckpt_dir", str(tiny_ckpt), "--max_seq_len", "32", "--max_gen_len", "32"]) == 1
    assert "--max_gen_len=32 must be below --max_seq_len=32" in capsys.readouterr().err


@pytest.mark.slow
def test_example_py_demo_runs_with_no_arguments():
    proc = run_python("example.py", "--max_gen_len", "6")
    assert proc.returncode == 0, proc.stderr
    assert "gibberish BY DESIGN" in proc.stderr
    assert proc.stdout.startswith("Once upon a time")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["example.py", "chat.py", "serve.py", "scripts/quantize.py"])
def test_the_checkout_commands_refuse_an_unknown_flag_at_once(command):
    proc = run_python(command, "--ckpt_dirr", "/x", "--port", "8000", timeout=60)
    assert proc.returncode == 2 and "unknown flag --ckpt_dirr" in proc.stderr and "Traceback" not in proc.stderr
    assert "loaded" not in proc.stderr and "gibberish" not in proc.stderr


@pytest.mark.slow
def test_a_bad_value_from_the_command_line_is_one_line_without_traceback():
    proc = run_python("example.py", "--temperature", "-1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --temperature=-1")


@pytest.mark.slow
def test_make_tiny_checkpoint_script(tmp_path):
    out = tmp_path / "made"
    proc = run_python("scripts/make_tiny_checkpoint.py", str(out), "--num_shards", "2", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    g = Llama.build(str(out), max_seq_len=16, max_batch_size=1)  # 2 shards on one process
    assert g.model.tok_embeddings.weight.shape == (g.model.vocab_size, 64)


def test_make_tiny_checkpoint_main(tmp_path, capsys):
    assert cli.run(script("make_tiny_checkpoint").main, [str(tmp_path / "made"), "--seed", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Llama.build(str(tmp_path / "made"), max_seq_len=16, max_batch_size=1).max_seq_len == 16


def test_the_package_holds_every_command():
    """Installed without the checkout, the console scripts reach only the package: example.py, chat.py and serve.py
    are one-line wrappers of it."""
    for name in ("example.py", "chat.py", "serve.py"):
        code = (ROOT / name).read_text()
        assert "from llama.commands." in code and "def main" not in code


@pytest.fixture
def served(monkeypatch):
    """llama-serve's main up to the point where it would serve: what it hands the server."""
    got = {}

    def serve_rank0(service, config, sock, preload=None):
        g = Llama.build(**service.pool.spec(service.default).build)  # here: the demo's folder lasts while it serves
        got.update(build=lambda: g, service=service, config=config, address=sock.getsockname())
        sock.close()
    monkeypatch.setattr("llama.serve.server.serve_rank0", serve_rank0)
    return got


def test_llama_serve_takes_the_context_and_name_from_the_checkpoint(served, tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    ckpt = tmp_path / "my-model"
    shutil.copytree(tiny_ckpt, ckpt)
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "max_seq_len": 96}))
    monkeypatch.setenv("LLAMA_API_KEY", "from-the-environment")
    assert cli.run(serve.main, ["--ckpt_dir", str(ckpt), "--port", "0", "--nopage", "--max_batch_size", "2"]) == 0
    service, config = served["service"], served["config"]
    assert (service.model_name, service.max_seq_len("my-model")) == ("my-model", 96)  # known before the model loads
    assert (config.api_key, config.page, served["address"][0]) == ("from-the-environment", False, "127.0.0.1")
    g = served["build"]()
    assert (g.max_seq_len, g.max_batch_size) == (96, 2)
    assert cli.run(serve.main, ["--ckpt_dir", str(ckpt), "--port", "0", "--max_seq_len", "48"]) == 0
    assert served["service"].max_seq_len("my-model") == 48 and served["build"]().max_seq_len == 48


def test_llama_serve_without_a_checkpoint_serves_the_demo(served, capsys):
    assert cli.run(serve.main, ["--port", "0", "--model_name", "0x1F", "--api_key", "k#1"]) == 0
    assert served["service"].model_name == "0x1F" and served["config"].api_key == "k#1"  # strings stay strings
    assert served["service"].max_seq_len("0x1F") == 2048 and served["build"]().max_seq_len == 2048


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port=70000 must be an integer from 0 to 65535"),
    (["--max_queue", "-1"], "--max_queue=-1 must be an integer >= 0"),
    (["--stream_interval", "2"], "--stream_interval=2 must be seconds from 0 to 1"),
    (["--api_key", " "], "--api_key is empty"),
])
def test_llama_serve_bad_flags_are_one_line_errors(served, argv, message, capsys):
    assert cli.run(serve.main, argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not served
