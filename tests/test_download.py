"""`python -m llama.download` against a stand-in for the Hugging Face Hub on 127.0.0.1 (tests/hub.py, through
HF_ENDPOINT): files land checked, a dropped or stalled connection resumes where it stopped, a rerun finishes an
interrupted download, a damaged file is fetched again and then refused, gated repositories need the token, and
the llama2.c shortcuts arrive converted. Nothing here reaches the internet."""
import hashlib
import json
import socket
import struct

import pytest
import torch

from conftest import ASSETS, ROOT, logits, run_python, subprocess_env
from hub import FakeHub
from llama import Llama, cli, download
from llama.hf import write_hf
from llama.llama2c import read_llama2c
from llama.loading import open_checkpoint
from llama.model import ModelArgs
from llama.tiny import random_state_dict, train_tokenizer

REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def hf_files(tiny_ckpt, tmp_path_factory):
    """The tiny model as a Hugging Face folder, file by file, and a README."""
    folder = write_hf(open_checkpoint(tiny_ckpt), tmp_path_factory.mktemp("hf") / "tiny")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    return {**files, "README.md": b"# a tiny model\n", "extra/notes.txt": b"not a weight\n"}


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Any connection to another host than this one fails the test."""
    connect = socket.socket.connect

    def local_only(self, address):  # (a name lookup fails on its own here: no DNS in CI)
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach {address}")
        return connect(self, address)
    monkeypatch.setattr(socket.socket, "connect", local_only)


@pytest.fixture
def hub(hf_files, monkeypatch):
    from huggingface_hub import constants

    with FakeHub({REPO: dict(hf_files), "meta-llama/Secret-7b": {"original/params.json": b"{}"}},
                 gated={"meta-llama/Secret-7b"}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        # what huggingface_hub read from HF_ENDPOINT at import (this process imported it before the hub was up)
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            h.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        # huggingface_hub's own handler writes to the sys.stderr it first saw, which capsys closes; its warnings
        # ("Trying to resume download...") are not what these tests read
        from huggingface_hub.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        yield h
        hf_logging.set_verbosity(level)


def fetch(*argv) -> int:
    return cli.run(download.main, list(map(str, argv)), prog="llama-download")


def test_a_repository_arrives_checked_and_loads(hub, hf_files, tiny_llama, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert fetch(REPO, "--dir", out) == 0
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and ".cache" not in p.parts}
    assert files == hf_files
    assert f"run it: llama-generate --ckpt_dir {out}" in capsys.readouterr().out
    g = Llama.build(str(out), max_seq_len=64, max_batch_size=1)
    tokens = torch.tensor([[1, 5, 9, 20]])
    torch.testing.assert_close(logits(g.model, tokens), logits(tiny_llama.model, tokens), atol=1e-5, rtol=1e-5)
    assert g.max_seq_len == 64
    # --include: only what matches; nothing else is fetched
    only = tmp_path / "only"
    assert fetch(REPO, "--include", "*.json", "tokenizer.model", "--dir", only) == 0
    got = sorted(p.relative_to(only).as_posix() for p in only.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert got == sorted(n for n in hf_files if n.endswith(".json") or n == "tokenizer.model")
    assert fetch(REPO, "--include", "*.gguf", "--dir", tmp_path / "none") == 1
    assert "no file of tiny-org/tiny-llama matches --include *.gguf" in capsys.readouterr().err


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface_hub writes what arrives in chunks (10 MB): small ones, for a file of this test's size."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 512)


def test_a_dropped_connection_resumes_where_it_stopped(hub, hf_files, tmp_path, small_chunks):
    weights = next(n for n in hf_files if n.endswith(".safetensors"))
    hub.faults[f"{REPO}/{weights}"] = {"cut": 1024}
    assert fetch(REPO, "--include", weights, "--dir", tmp_path) == 0
    assert (tmp_path / weights).read_bytes() == hf_files[weights]
    assert hub.ranges(REPO, weights) == [None, "bytes=1024-"]  # the second request took up at byte 1024


def test_a_stalled_download_resumes(hub, hf_files, tmp_path, small_chunks, monkeypatch):
    from huggingface_hub import constants

    weights = next(n for n in hf_files if n.endswith(".safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    hub.faults[f"{REPO}/{weights}"] = {"stall": 2048, "stall_s": 3}
    assert fetch(REPO, "--include", weights, "--dir", tmp_path) == 0
    assert (tmp_path / weights).read_bytes() == hf_files[weights]
    assert hub.ranges(REPO, weights) == [None, "bytes=2048-"]


def test_a_rerun_finishes_an_interrupted_download(hub, hf_files, tmp_path, capsys):
    weights = next(n for n in hf_files if n.endswith(".safetensors"))
    hub.faults[f"{REPO}/{weights}"] = {"fail": True}
    assert fetch(REPO, "--dir", tmp_path) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: downloading tiny-org/tiny-llama") and "run the same command again" in err
    assert len(err.splitlines()) == 1
    del hub.faults[f"{REPO}/{weights}"]
    before = {name: hub.gets(REPO, name) for name in hf_files}
    done = {name for name in hf_files if (tmp_path / name).exists()}
    assert fetch(REPO, "--dir", tmp_path) == 0
    fetched = {name for name in hf_files if hub.gets(REPO, name) > before[name]}
    assert done and weights not in done and fetched == set(hf_files) - done  # what was complete was kept (checked)
    assert (tmp_path / weights).read_bytes() == hf_files[weights]


def test_a_damaged_file_is_fetched_again_then_refused(hub, hf_files, tmp_path, capsys, caplog):
    weights = next(n for n in hf_files if n.endswith(".safetensors"))
    key = f"{REPO}/{weights}"
    hub.faults[key] = {"corrupt_once": True}
    assert fetch(REPO, "--include", weights, "--dir", tmp_path / "a") == 0
    assert (tmp_path / "a" / weights).read_bytes() == hf_files[weights] and hub.gets(REPO, weights) == 2
    assert "does not match the Hub's" in caplog.text
    hub.faults[key] = {"corrupt": True}
    assert fetch(REPO, "--include", weights, "--dir", tmp_path / "b") == 1
    assert "arrived damaged twice (sha256" in capsys.readouterr().err
    assert not (tmp_path / "b" / weights).exists()
    # a small file outside LFS is checked by its git blob id
    hub.faults[f"{REPO}/config.json"] = {"corrupt": True}
    assert fetch(REPO, "--include", "config.json", "--dir", tmp_path / "c") == 1
    assert "config.json arrived damaged twice (git-sha1" in capsys.readouterr().err


def test_a_file_damaged_on_disk_is_fetched_again(hub, hf_files, tmp_path):
    assert fetch(REPO, "--include", "tokenizer.model", "--dir", tmp_path) == 0
    local = tmp_path / "tokenizer.model"
    local.write_bytes(b"x" + local.read_bytes()[1:])
    assert fetch(REPO, "--include", "tokenizer.model", "--dir", tmp_path) == 0
    assert local.read_bytes() == hf_files["tokenizer.model"] and hub.gets(REPO, "tokenizer.model") == 2


def test_a_gated_repository_needs_the_token(hub, tmp_path, capsys, monkeypatch):
    assert fetch("meta-llama/Secret-7b", "--include", "original/*", "--dir", tmp_path) == 1
    err = capsys.readouterr().err
    assert f"meta-llama/Secret-7b is gated: accept its license at {hub.url}/meta-llama/Secret-7b" in err
    assert "hf auth login" in err
    monkeypatch.setenv("HF_TOKEN", hub.token)  # the usual place
    assert fetch("meta-llama/Secret-7b", "--include", "original/*", "--dir", tmp_path) == 0
    assert (tmp_path / "original" / "params.json").read_bytes() == b"{}"
    assert hub.requests[-1]["headers"]["authorization"] == f"Bearer {hub.token}"
    assert fetch("nobody/nothing", "--dir", tmp_path) == 1
    assert "nobody/nothing is not a repository on" in capsys.readouterr().err
    assert fetch("stories9B", "--dir", tmp_path) == 1
    assert "neither a Hub repository (owner/name) nor a shortcut" in capsys.readouterr().err


def write_llama2c(path, args: ModelArgs, sd, seq_len: int) -> bytes:
    """A llama2.c "legacy" file of `sd` (llama.llama2c reads this layout)."""
    head = struct.pack("<7i", args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                       args.vocab_size, seq_len)
    layers = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    parts = [sd["tok_embeddings.weight"]]
    parts += [torch.stack([sd[f"layers.{i}.{name}.weight"] for i in range(args.n_layers)]) for name in layers]
    parts += [sd["norm.weight"], torch.zeros(seq_len * args.head_dim)]  # the obsolete RoPE tables
    data = head + b"".join(t.contiguous().numpy().tobytes() for t in parts)
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def llama2c_model(tmp_path_factory):
    """A random llama2.c model with a tied output (as stories260K's), its tokenizer, and its state dict."""
    folder = tmp_path_factory.mktemp("llama2c")
    tok = train_tokenizer(folder / "tok.model", vocab_size=512)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    sd = random_state_dict(args, seed=3)
    sd["output.weight"] = sd["tok_embeddings.weight"]
    data = write_llama2c(folder / "model.bin", args, sd, seq_len=96)
    return data, tok.read_bytes(), sd


def test_llama2c_files_read_as_their_weights(llama2c_model, tmp_path):
    data, _, sd = llama2c_model
    (tmp_path / "m.bin").write_bytes(data)
    params, got = read_llama2c(tmp_path / "m.bin")
    assert params["max_seq_len"] == 96 and ModelArgs.from_params(params).hidden_dim == 192
    assert got.keys() == sd.keys()
    for name in sd:
        assert torch.equal(got[name], sd[name]), name
    (tmp_path / "short.bin").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="ends early"):
        read_llama2c(tmp_path / "short.bin")


def test_a_shortcut_arrives_converted(hub, llama2c_model, tmp_path, monkeypatch, capsys):
    data, tok, sd = llama2c_model
    hub.repos["someone/stories"] = {"m/model.bin": data, "m/tok.model": tok}
    shortcut = download.Shortcut((
        download.Remote("someone/stories", "m/model.bin", "storiesT.bin", None, "0" * 40),
        download.Remote("someone/stories", "m/tok.model", "tok.model", hashlib.sha256(tok).hexdigest())))
    monkeypatch.setitem(download.SHORTCUTS, "storiesT", shortcut)
    out = tmp_path / "storiesT"
    assert fetch("storiesT", "--dir", out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["storiesT"]  # the downloaded parts are gone
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert json.loads((out / "params.json").read_text())["max_seq_len"] == 96
    g = Llama.build(str(out), max_batch_size=1)
    assert g.max_seq_len == 96  # the context it was trained with
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(state[name], sd[name]) for name in sd)
    # a pinned checksum the Hub's file does not match: refused
    monkeypatch.setitem(download.SHORTCUTS, "storiesT", download.Shortcut((
        download.Remote("someone/stories", "m/model.bin", "storiesT.bin", "ab" * 32), shortcut.files[1])))
    assert fetch("storiesT", "--dir", tmp_path / "again") == 1
    assert "is not the file this shortcut expects" in capsys.readouterr().err


@pytest.fixture
def real_hub(hub):
    """The real stories260K files and tokenizers where the shortcuts look for them (skipped without the assets)."""
    from conftest import asset

    tinyllamas = {f"stories260K/{n}": asset(n).read_bytes() for n in ("stories260K.bin", "tok512.model", "tok512.bin")}
    hub.repos["karpathy/tinyllamas"] = tinyllamas
    hub.repos["TinyLlama/TinyLlama_v1.1"] = {"tokenizer.model": asset("llama_tokenizer.model").read_bytes()}
    hub.repos["meta-llama/Meta-Llama-3-8B"] = {"original/tokenizer.model": asset("llama3_tokenizer.model").read_bytes()}
    hub.gated.add("meta-llama/Meta-Llama-3-8B")
    return hub


def test_the_stories260k_shortcut_tells_its_published_story(real_hub, tmp_path):
    assert fetch("stories260K", "--dir", tmp_path / "s") == 0
    g = Llama.build(str(tmp_path / "s"), max_batch_size=1)
    assert g.max_seq_len == 512
    story = g.text_completion(["Once upon a time"], temperature=0, max_gen_len=20)[0]["generation"]
    assert story.startswith(", there was a little girl named Lily.")
    assert real_hub.ranges("karpathy/tinyllamas", "stories260K/stories260K.bin") == [None]


def test_test_assets_fill_a_folder_the_tests_read(real_hub, tmp_path, capsys, monkeypatch):
    assert fetch("test-assets", "--dir", tmp_path) == 0
    assert "skipped llama3_tokenizer.model: meta-llama/Meta-Llama-3-8B is gated" in capsys.readouterr().err
    names = ["llama_tokenizer.model", "stories260K.bin", "tok512.bin", "tok512.model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for name in names:
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes()
    monkeypatch.setenv("HF_TOKEN", real_hub.token)
    assert fetch("test-assets", "--dir", tmp_path) == 0
    assert (tmp_path / "llama3_tokenizer.model").read_bytes() == (ASSETS / "llama3_tokenizer.model").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "llama.download"], ["scripts/download.py"]])
def test_the_command_downloads_with_hf_endpoint(hub, hf_files, tmp_path, command):
    env = subprocess_env(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    import subprocess
    import sys

    from conftest import require_slow

    require_slow("starts a process")
    proc = subprocess.run([sys.executable, *command, REPO, "--include", "config.json", "--dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "config.json").read_bytes() == hf_files["config.json"]
    bad = run_python(*command, REPO, "--includ", "x")
    assert bad.returncode == 2 and "did you mean --include?" in bad.stderr
