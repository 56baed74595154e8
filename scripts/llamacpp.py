"""llama.cpp as an anchor for scripts/benchmark.py (and load_test.py): find its binaries, convert a
checkpoint to GGUF through our Hugging Face export, and run llama-bench and llama-simple.

Nothing of llama.cpp ships here. Build it outside this repository from the sources inside the
llama-cpp-python source distribution (docs/performance.md):

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B llama.cpp-build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build llama.cpp-build -j2 --target llama-bench llama-quantize llama-server llama-simple

and pass `--llamacpp llama.cpp-build/bin` (or put that folder on PATH). The GGUF conversion runs the
sources' convert_hf_to_gguf.py with their own gguf-py (or the `gguf` package), found from the
build's CMakeCache.txt or given with `--llamacpp_src`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

TOOLS = ("llama-bench", "llama-quantize", "llama-simple", "llama-server")
# our --quantize mode (None: the float dtype) -> llama.cpp's weight type
GGUF_TYPES = {"bf16": "BF16", "float32": "F32", "fp16": "F16", "int8": "Q8_0", "int4": "Q4_0"}


class LlamaCpp:
    """A llama.cpp build: `bin` holds its tools, `src` its sources (for convert_hf_to_gguf.py)."""

    def __init__(self, bin_dir: Optional[str] = None, src_dir: Optional[str] = None):
        self.bin = self._find_bin(bin_dir)
        self.src = self._find_src(src_dir)

    @staticmethod
    def _find_bin(bin_dir: Optional[str]) -> Path:
        if bin_dir is not None:
            folder = Path(bin_dir)
            if (folder / "bin" / TOOLS[0]).is_file():
                folder = folder / "bin"  # the build folder itself
        else:
            found = shutil.which(TOOLS[0])
            if found is None:
                raise FileNotFoundError("--compare llamacpp needs llama.cpp's tools: pass --llamacpp BUILD/bin or put "
                                        "llama-bench on PATH (docs/performance.md says how to build them)")
            folder = Path(found).resolve().parent
        missing = [t for t in TOOLS if not (folder / t).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks llama.cpp's {', '.join(missing)}: build those targets "
                                    "(docs/performance.md)")
        return folder

    def _find_src(self, src_dir: Optional[str]) -> Path:
        if src_dir is None:
            cache = self.bin.parent / "CMakeCache.txt"
            text = cache.read_text() if cache.is_file() else ""
            match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", text, re.M)
            if match is None:
                raise FileNotFoundError(f"no CMakeCache.txt beside {self.bin} names llama.cpp's sources: pass "
                                        "--llamacpp_src with the folder holding convert_hf_to_gguf.py")
            src_dir = match.group(1)
        src = Path(src_dir)
        if not (src / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"{src} holds no convert_hf_to_gguf.py: pass --llamacpp_src with llama.cpp's "
                                    "source folder")
        return src

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    def _env(self) -> dict:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.bin), env.get("LD_LIBRARY_PATH")) if p)
        gguf_py = self.src / "gguf-py"
        if gguf_py.is_dir():  # the converter's own gguf package, not whichever is installed
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(gguf_py), env.get("PYTHONPATH")) if p)
        return env

    def run(self, args: List[str], timeout: float = 1800) -> str:
        proc = subprocess.run(args, env=self._env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} ... failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return proc.stdout

    # Conversion.

    def gguf(self, hf_dir: Path, out_dir: Path, weight_type: str, float_type: str) -> Path:
        """The GGUF of Hugging Face folder `hf_dir` with `weight_type` weights, written once into
        `out_dir`: float types by convert_hf_to_gguf.py, Q8_0 / Q4_0 by llama-quantize from the
        `float_type` file (every tensor of that type: --pure, as our int8 / int4 quantize every linear)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"model-{weight_type}.gguf"
        if out.is_file():
            return out
        tmp = out.with_suffix(".tmp")
        if weight_type in ("F32", "BF16", "F16"):
            self.run([sys.executable, str(self.src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype",
                      weight_type.lower(), "--outfile", str(tmp)])
        else:
            source = self.gguf(hf_dir, out_dir, float_type, float_type)
            self.run([self.tool("llama-quantize"), "--pure", str(source), str(tmp), weight_type])
        os.replace(tmp, out)
        return out

    def streamed_bytes(self, gguf: Path) -> Tuple[int, Dict[str, int]]:
        """Bytes a batch-1 decode step reads from `gguf`: every tensor but the token embedding, of which
        one row; and the bytes of each tensor type."""
        sys.path.insert(0, str(self.src / "gguf-py"))
        try:
            from gguf import GGUFReader
        finally:
            sys.path.pop(0)
        reader = GGUFReader(str(gguf))
        total, types = 0, {}
        for t in reader.tensors:
            n = int(t.n_bytes)
            if t.name == "token_embd.weight":
                n //= int(t.shape[-1]) if len(t.shape) > 1 else 1  # one row of the table
            total += n
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
        return total, types

    # Runs.

    def bench(self, gguf: Path, threads: int, prompt_len: int, gen_len: int) -> Dict[str, float]:
        """llama-bench tok/s: the prefill of `prompt_len` tokens, and `gen_len` decode steps after a context of
        `prompt_len` (one repetition each; the tool warms up first)."""
        common = [self.tool("llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
        out = {}
        if prompt_len:
            rows = json.loads(self.run(common + ["-p", str(prompt_len), "-n", "0"]))
            out["prefill_tok_s"] = float(rows[0]["avg_ts"])
        if gen_len:
            rows = json.loads(self.run(common + ["-p", "0", "-n", str(gen_len), "-d", str(prompt_len)]))
            out["decode_tok_s"] = float(rows[0]["avg_ts"])
        return out

    def greedy_text(self, gguf: Path, prompt: str, n: int, threads: int) -> str:
        """llama-simple's greedy continuation of `prompt`, `n` tokens, as text (the prompt removed)."""
        out = self.run([self.tool("llama-simple"), "-m", str(gguf), "-n", str(n), prompt], timeout=600)
        return out[out.find(prompt) + len(prompt):] if prompt in out else out


def hf_export(ckpt_dir: str, out_dir: Path) -> Path:
    """Our Hugging Face export of `ckpt_dir` (scripts/convert_checkpoint.py --to hf), written once."""
    from llama.hf import write_hf
    from llama.loading import open_checkpoint

    if not (out_dir / "config.json").is_file():
        write_hf(open_checkpoint(ckpt_dir), out_dir)
    return out_dir


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
