import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

from llama import Llama, ModelArgs, Transformer
from llama.distributed import setup_model_parallel
from llama.tiny import TINY_PARAMS, make_tiny_checkpoint, random_state_dict

# Property tests: bounded and derandomized by default (CI); `pytest --hypothesis-profile=long` digs deeper.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
# The real files some tests read (README: "Tests"): ../shared/assets beside the checkout, or wherever
# LLAMA_TEST_ASSETS points. `python -m llama.download test-assets --dir DIR` fills such a folder.
ASSETS = Path(os.environ.get("LLAMA_TEST_ASSETS") or ROOT.parent / "shared" / "assets").expanduser()


def asset(name: str) -> Path:
    """A real file from the assets folder, or skip: a fresh clone has no ../shared."""
    path = ASSETS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: real assets live in ../shared/assets beside the repo, or in the folder "
                    "LLAMA_TEST_ASSETS names (fill one with: python -m llama.download test-assets --dir DIR)")
    return path


_running: list = []  # the test being run, for the checks below


@pytest.fixture(autouse=True)
def _current_test(request):
    _running.append(request.node)
    yield
    _running.pop()


def require_slow(what: str) -> None:
    """Refuse `what` (a process, a compilation) in a test not marked slow: `pytest -m "not slow"` is the quick loop
    and must stay one."""
    node = _running[-1] if _running else None
    if node is not None and node.get_closest_marker("slow") is None:
        pytest.fail(f"{node.nodeid} {what}: mark it @pytest.mark.slow (the quick loop runs no processes)",
                    pytrace=False)


def script(name: str):
    """scripts/NAME.py imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    """The environment for child processes: they import `llama` from this checkout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def torchrun(nproc: int, *args: str, timeout: float = 120, input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc_per_node nproc ARGS...` from the repo root."""
    require_slow("starts processes (torchrun)")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    env = subprocess_env(OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, input=input)


# The hardening probes' check: a fixed greedy request whose text must not change with any abuse of the server.
PROBE = {"prompt": "The cat", "max_tokens": 12, "temperature": 0}


def probe(url: str, headers: Optional[dict] = None) -> str:
    """The text the server at `url` gives the probe request now."""
    import httpx

    r = httpx.post(url + "/v1/completions", json=PROBE, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def run_python(*args: str, timeout: float = 120, input: Optional[str] = None) -> subprocess.CompletedProcess:
    require_slow(f"starts a process (python {' '.join(args[:1])})")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, input=input)


def run_main(main, *argv) -> Tuple[int, str, str]:
    """A command's `main` (llama/commands, or a script's: `script(NAME).main`) run on the command line `argv` in
    this process, as llama.cli runs it: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from llama import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.run(main, [str(a) for a in argv], prog=getattr(main, "__module__", "main"))
    return status, out.getvalue(), err.getvalue()


def start_process(cmd, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, for a slow test."""
    require_slow(f"starts a process ({' '.join(map(str, cmd[:2]))})")
    return subprocess.Popen(cmd, **kwargs)


@pytest.fixture
def served(monkeypatch):
    """llama-serve's main up to the point where it would serve: its Service."""
    got = {}

    def serve_rank0(service, config, sock, preload=None):
        got["service"] = service
        sock.close()
    monkeypatch.setattr("llama.serve.server.serve_rank0", serve_rank0)
    return got


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny1", num_shards=1, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt2(tmp_path_factory) -> Path:
    """The same weights as tiny_ckpt, cut into 2 model-parallel shards."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny2", num_shards=2, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_ckpt) -> Llama:
    return Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                       device="cpu")


@pytest.fixture(scope="session")
def stories_ckpt(tmp_path_factory) -> Path:
    """The real stories260K model converted to Meta's layout (scripts/convert_llama2c.py's conversion)."""
    from llama.llama2c import convert_llama2c

    model, tok = asset("stories260K.bin"), asset("tok512.model")
    return convert_llama2c(model, tok, tmp_path_factory.mktemp("stories") / "stories260K")


def random_model(seed: int = 0, max_seq_len: int = 64, max_batch_size: int = 4, **overrides):
    """A one-process Transformer with random float32 weights, and its state dict."""
    setup_model_parallel(1, torch.device("cpu"))
    args = ModelArgs.from_params({**TINY_PARAMS, "vocab_size": 256, **overrides}, max_seq_len=max_seq_len,
                                 max_batch_size=max_batch_size)
    sd = random_state_dict(args, seed=seed)
    model = Transformer(args)
    model.load_state_dict(sd)
    model.setup_cache()
    return model.eval().requires_grad_(False), sd


def logits(model, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The model's logits for `tokens` (B, T) from position `start`, each row in KV-cache blocks of its own:
    what Meta's `model(tokens, start_pos)` computed."""
    return model(tokens, *model.layout(tokens.shape[0], start, tokens.shape[1]))


def resident_bytes(key: str) -> int:
    """This process's VmRSS (resident now) or VmHWM (the peak) from /proc/self/status, in bytes."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def restart_peak_rss() -> int:
    """Restart the peak resident size (VmHWM) from the current one, which it returns; skip off Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs")
    return resident_bytes("VmRSS")


def teacher_forced(ref, q, what: str):
    """Llama `q` against `ref` on ref's greedy story from BOS (over 200 tokens): top-1 agreement, the
    perplexity ratio q / ref, and both models' logits."""
    story, _ = ref.generate([[ref.tokenizer.bos_id]], max_gen_len=255, temperature=0)
    tokens = torch.tensor([[ref.tokenizer.bos_id] + story[0]])
    assert tokens.shape[1] > 200
    ref_logits, q_logits = logits(ref.model, tokens)[0, :-1], logits(q.model, tokens)[0, :-1]
    agreement = (ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()
    targets = tokens[0, 1:]
    ppl_ref = F.cross_entropy(ref_logits, targets).exp().item()
    ppl_q = F.cross_entropy(q_logits, targets).exp().item()
    print(f"{what} top-1 agreement {agreement:.2%}, perplexity {ppl_q:.4f} vs {ppl_ref:.4f}")
    return agreement, ppl_q / ppl_ref, ref_logits, q_logits
