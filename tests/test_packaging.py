"""The package stands alone: its wheel holds every command, and `python -m llama.serve`, run from the unpacked wheel
in another folder (no checkout on the path), serves the demo model."""
import signal
import sys
import time
import zipfile

import httpx
import pytest

from conftest import ROOT, free_port, start_process, subprocess_env

pytestmark = pytest.mark.slow  # builds a wheel and starts a server


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    import subprocess

    out = tmp_path_factory.mktemp("wheel")
    try:
        import setuptools  # noqa: F401 - present: build with it, without fetching a fresh one
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    proc = start_process([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out),
                          str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return next(out.glob("llama-*.whl"))


def test_the_wheel_holds_the_commands_and_their_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("llama/cli.py", "llama/commands/generate.py", "llama/commands/chat.py", "llama/commands/serve.py",
                   "llama/serve/__main__.py", "llama/download.py", "llama/llama2c.py", "llama/serve/page.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "scripts/")) or n in ("example.py", "serve.py") for n in names)
    for line in ("llama-generate = llama.commands.generate:run", "llama-chat = llama.commands.chat:run",
                 "llama-serve = llama.commands.serve:run", "llama-download = llama.download:run"):
        assert line in entry_points


def test_python_m_llama_serve_from_the_wheel_alone_serves_the_demo(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = {**subprocess_env(OMP_NUM_THREADS="1"), "PYTHONPATH": str(site)}  # the package, not the checkout
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = start_process([sys.executable, "-m", "llama.serve", "--port", str(port), "--max_batch_size", "2",
                              "--nopage"], cwd=elsewhere, env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert card["id"] == "llama-tiny-demo" and card["max_model_len"] == 2048
        r = httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "serve.log").read_text()
    assert "gibberish BY DESIGN" in log and "ready: llama-tiny-demo" in log
    import subprocess

    where = start_process([sys.executable, "-c", "import llama; print(llama.__file__)"], cwd=elsewhere, env=env,
                          stdout=subprocess.PIPE, text=True).communicate(timeout=60)[0]
    assert where.strip() == str(site / "llama" / "__init__.py")  # the unpacked wheel's, not the checkout's
