"""Serving speed over HTTP: N concurrent streaming clients against serve.py, against the same requests sent
one at a time, and against `transformers serve --continuous-batching` on the same weights.

    python scripts/load_test.py --ckpt_dir /tmp/stories260K --clients 1,4,16,64 --compare hf
    python scripts/load_test.py --shape tinyllama-1.1b --dtype bf16 \
        --tokenizer_path ../shared/assets/llama_tokenizer.model --clients 1,8 --max_tokens 16 --compare hf
    python scripts/load_test.py --shape tinyllama-1.1b --dtype bf16 --quantize int4 \
        --tokenizer_path ../shared/assets/llama_tokenizer.model --clients 8 --max_tokens 32 --compare llamacpp \
        --llamacpp /path/to/llama.cpp-build/bin
    python scripts/load_test.py --smoke       # tiny random weights, 1 and 4 clients, a few tokens: seconds
    python scripts/load_test.py --ckpt_dir /tmp/stories260K --max_seq_len 2048 --multiturn 10 --shared_prefix 16 \
        --capacity
    python scripts/load_test.py --ckpt_dir /tmp/stories260K --several_models --load_shape tinyllama-1.1b \
        --load_tokenizer_path ../shared/assets/llama_tokenizer.model

Each server runs in its own process (the client's work must not share the server's interpreter
lock), started here and stopped at the end; with --compare hf both are up at once, idle in turn.
At each level N, N clients each send `--rounds` greedy streaming /v1/completions requests back to
back, prompts of mixed lengths, on every server in turns, `--repeats` times (so the machine's
drifting load hits them alike). The report gives, per level and server, medians over the repeats
of total tokens per second (completion tokens, from each stream's usage, over the level's wall
time), time to first token (p50, p99) and the gap between content chunks (p50, p99; a chunk may
carry several tokens, `tokens_per_chunk`: see serve.py's --stream_interval), and ratios
ours / other as median [min-max] over the repeats. "ours one at a time" sends the same requests
sequentially; "hf" is `transformers serve --continuous-batching` on an HF folder (--hf_dir, or one
written by scripts/convert_checkpoint.py --to hf); "llamacpp" is llama.cpp's `llama-server` on the same weights
converted to GGUF (BF16, F32, or with --quantize int8 / int4 Q8_0 / Q4_0; scripts/llamacpp.py finds the build),
one slot per client. `overhead` compares one stream's time per token
over HTTP (the servers otherwise idle) with the same request's in this process (Llama.submit), in
turns: the HTTP and streaming cost per token as a fraction of a decode step. Absolute speeds drift
with the machine's load: compare the ratios of one run. Progress goes to stderr, the JSON report
to stdout.

The prefix cache's checks: --multiturn N, a chat of N turns with a system prompt of --system_words
words (each turn sends the whole conversation again), against the same server with
--noprefix_cache, time to first token and cached prompt tokens per turn; --shared_prefix N, N chat
requests at once sharing that system prompt, the prompt tokens computed (from /metrics) against
the least possible; --capacity, a server of 64 rows x 2048 positions whose cache holds only 16384,
64 requests of 100 new tokens at once (the most running at once, from /metrics), then one long one.

Several models (--several_models): one server of two models, a (--ckpt_dir) and b (other random weights of
its shape), against a server of each alone: the same greedy texts, and --clients' largest level of
clients on each model at once, every request answered; then a server of three models with --max_loaded 2,
where a streams (a chunk per step) while b or c loads on its first request (another model's load, in
turns, --repeats times; --load_shape or --load_ckpt_dir for a bigger one, --load_tokenizer_path for the
tokenizer of a --load_shape): each load's time, the wait of
its first request (from its arrival to its first token: the unload of the least recently used idle
model, the load, the prefill), and the gaps between a's chunks (a's requests back to back) while that
request waits, against those before it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

_WORDS = ("once upon a time there was a little girl named lily she loved to play outside in the park with her "
          "dog the sun was bright and the birds sang one day she found a big red ball under a tree").split()


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompts(n: int, seed: int = 0) -> List[str]:
    """n prompts of 2 to 24 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(2, 25))).capitalize() for _ in range(n)]


def _quantile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _one(host: str, port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion on a connection of its own: its timings, token count and text."""
    return await _stream(host, port, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens})


async def _stream(host: str, port: int, path: str, request: dict) -> dict:
    """One greedy streaming request (completion or chat) on a connection of its own: its timings, token count,
    text and usage. A bare HTTP/1.1 client (chunked transfer, SSE events), light enough that it leaves the
    CPU to the server."""
    body = json.dumps({**request, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (path.encode(), host.encode(), len(body), body))
    arrivals: List[float] = []
    tokens, text, usage = None, [], None
    try:
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        if b" 200 " not in status:
            raise RuntimeError(f"{status.decode().strip()}: {(await reader.read(300))!r}")
        if headers.get("transfer-encoding") != "chunked":
            raise RuntimeError(f"expected a chunked stream, got the headers {headers}")
        pending = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            *events, pending = pending.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if piece:
                        arrivals.append(now)
                        text.append(piece)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    tokens = usage["completion_tokens"]
    finally:
        writer.close()
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens, "text": "".join(text), "usage": usage}


async def _level(url: str, model: str, texts: List[str], clients: int, max_tokens: int) -> dict:
    """`clients` clients share out `texts` (client i sends texts i, i + clients, ...), each one at a time."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    results: List[Optional[dict]] = [None] * len(texts)

    async def run(i: int) -> None:
        for j in range(i, len(texts), clients):
            results[j] = await _one(host, int(port), model, texts[j], max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(clients)))
    return _summary(results, time.perf_counter() - start, clients)


def _summary(results: List[dict], wall: float, clients: int) -> dict:
    ttft = [r["arrivals"][0] - r["sent"] for r in results if r["arrivals"]]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] or len(r["arrivals"]) for r in results)
    chunks = sum(len(r["arrivals"]) for r in results)
    # after the first token, the rest of each stream: (last arrival - first arrival) / (its tokens - 1)
    decode = [(r["arrivals"][-1] - r["arrivals"][0]) / ((r["tokens"] or len(r["arrivals"])) - 1)
              for r in results if len(r["arrivals"]) > 1]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_ms": {"p50": _quantile(ttft, 0.5) * 1e3, "p99": _quantile(ttft, 0.99) * 1e3},
            "chunk_gap_ms": {"p50": _quantile(gaps, 0.5) * 1e3, "p99": _quantile(gaps, 0.99) * 1e3},
            "tokens_per_chunk": tokens / max(chunks, 1),
            "decode_s_per_token": statistics.median(decode) if decode else float("nan"),
            "texts": [r["text"] for r in results]}


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not come up:\n{log.read_text()[-3000:]}")


class _Server:
    """A server process, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, cmd: List[str], port: int, log: Path, env: dict):
        self.cmd, self.url, self.log, self.env = cmd, f"http://127.0.0.1:{port}", log, env

    def __enter__(self) -> "_Server":
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        try:
            _wait_healthy(self.proc, self.url, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(servers: Dict[str, "_Server"], models: Dict[str, str], levels: List[int], rounds: int, repeats: int,
             max_tokens: int, serial: bool) -> Dict[str, dict]:
    """Each level on every server in turns, `repeats` times (so that the machine's drifting load hits them
    alike); medians per level, and ratios as median [min-max] over the repeats."""
    for name, server in servers.items():  # every batch size comes by (serve.py --compile compiles its buckets first)
        progress(f"warm-up: {name}")
        asyncio.run(_level(server.url, models[name], prompts(max(levels), seed=99), max(levels), min(max_tokens, 8)))
    out: Dict[str, dict] = {}
    for n in levels:
        texts = prompts(n * rounds)
        runs = {name: (server.url, models[name], n) for name, server in servers.items()}
        if serial and n > 1:
            runs["ours one at a time"] = (servers["ours"].url, models["ours"], 1)
        samples: Dict[str, List[dict]] = {name: [] for name in runs}
        for r in range(repeats):
            for name, (url, model, clients) in runs.items():
                progress(f"{n} client(s), {len(texts)} request(s), repeat {r + 1}/{repeats}: {name}")
                samples[name].append(asyncio.run(_level(url, model, texts, clients, max_tokens)))
        row = {name: _median_summary(rows) for name, rows in samples.items()}
        ratios = {f"ours / {name}": _median_range([a["tok_s"] / b["tok_s"] for a, b in zip(samples["ours"], rows)])
                  for name, rows in samples.items() if name != "ours"}
        same = {f"{name}: same texts as ours": rows[-1]["texts"] == samples["ours"][-1]["texts"]
                for name, rows in samples.items() if name != "ours"}
        out[str(n)] = {**row, "ratios": ratios, **same}
    return out


def _median_summary(rows: List[dict]) -> dict:
    def med(f):
        return statistics.median(f(r) for r in rows)

    return {"clients": rows[0]["clients"], "requests": rows[0]["requests"], "tokens": rows[0]["tokens"],
            "tok_s": med(lambda r: r["tok_s"]),
            "ttft_ms": {q: med(lambda r: r["ttft_ms"][q]) for q in ("p50", "p99")},
            "chunk_gap_ms": {q: med(lambda r: r["chunk_gap_ms"][q]) for q in ("p50", "p99")},
            "tokens_per_chunk": med(lambda r: r["tokens_per_chunk"])}


def _median_range(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _with_tokenizer(ckpt_dir: str, tokenizer_path: str, out: Path) -> str:
    """A folder of links to the checkpoint's files, with `tokenizer_path` as its tokenizer.model: random weights
    of a named shape come with a small stand-in tokenizer, whose pieces do not cover the shape's vocabulary."""
    out.mkdir()
    for f in Path(ckpt_dir).iterdir():
        if f.name != "tokenizer.model":
            (out / f.name).symlink_to(f.resolve())
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return str(out)


def _overhead(url: str, model: str, ckpt_dir: Optional[str], dtype: Optional[str], max_seq_len: int,
              max_tokens: int, threads: Optional[int], compile: bool, rounds: int) -> dict:
    """Seconds per token after the first of one greedy request, over HTTP (streamed, the server otherwise
    idle) and in this process (Llama.submit, waited on), in turns; the median of their ratios, minus 1, is
    the HTTP and streaming cost as a fraction of a decode step."""
    import torch

    from llama import Llama

    if threads:
        torch.set_num_threads(threads)
    g = Llama.build(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=1, dtype=dtype, device="cpu", compile=compile)
    text = prompts(1, seed=7)[0]
    prompt = g.tokenizer.encode(text, bos=True, eos=False)
    g.submit(prompt, 2, temperature=0).wait()  # warm-up
    http, local = [], []
    for _ in range(rounds):
        one = asyncio.run(_level(url, model, [text], 1, max_tokens))
        http.append(one["decode_s_per_token"])
        start = time.perf_counter()
        c = g.submit(prompt, max_tokens, temperature=0).wait()
        local.append((time.perf_counter() - start - c.ttft) / max(len(c.tokens) - 1, 1))
    ratios = [h / l_ for h, l_ in zip(http, local)]
    return {"http_s_per_token": statistics.median(http), "in_process_s_per_token": statistics.median(local),
            "fraction_of_a_step": statistics.median(ratios) - 1, "rounds": rounds}


# The prefix cache: a multi-turn chat, requests sharing a system prompt, and a server sized by kv_cache_tokens.

def _system_prompt(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return f"Story {seed}. " + " ".join(rng.choice(_WORDS) for _ in range(words))


def _chat(url: str, model: str, messages: List[dict], max_tokens: int) -> dict:
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    return asyncio.run(_stream(host, int(port), "/v1/chat/completions",
                               {"model": model, "messages": messages, "max_tokens": max_tokens}))


def _metric(url: str, name: str) -> float:
    """A series of our /metrics (summed over its labels)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _multiturn(servers: Dict[str, "_Server"], turns: int, repeats: int, max_tokens: int, system_words: int) -> dict:
    """A chat of `turns` turns, each sending the whole conversation again as chat clients do, on each server in
    turns, `repeats` times (each repeat with a system prompt of its own, so that none starts cached): time to
    first token and the prompt tokens found cached, per turn."""
    runs: Dict[str, List[List[dict]]] = {name: [] for name in servers}
    models = {name: httpx.get(server.url + "/v1/models").json()["data"][0]["id"] for name, server in servers.items()}
    for r in range(repeats):
        system = _system_prompt(system_words, seed=r)
        for name, server in servers.items():
            progress(f"multi-turn chat, repeat {r + 1}/{repeats}: {name}")
            rng = random.Random(100 + r)
            messages, per_turn = [{"role": "system", "content": system}], []
            for _ in range(turns):
                messages.append({"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(8))})
                one = _chat(server.url, models[name], messages, max_tokens)
                messages.append({"role": "assistant", "content": one["text"]})
                first = one["arrivals"][0] if one["arrivals"] else float("nan")
                per_turn.append({"ttft_ms": (first - one["sent"]) * 1e3, "prompt_tokens": one["usage"]["prompt_tokens"],
                                 "cached_tokens": one["usage"]["prompt_tokens_details"]["cached_tokens"]})
            runs[name].append(per_turn)
    out: dict = {}
    for name, repeats_ in runs.items():
        out[name] = [{"turn": t + 1, "ttft_ms": statistics.median(r[t]["ttft_ms"] for r in repeats_),
                      "prompt_tokens": repeats_[0][t]["prompt_tokens"],
                      "cached_fraction": statistics.median(r[t]["cached_tokens"] / r[t]["prompt_tokens"]
                                                           for r in repeats_)} for t in range(turns)]
    names = list(servers)
    out["ratios"] = {f"ttft at turn {turns}: {names[0]} / {names[1]}": _median_range(
        [a[-1]["ttft_ms"] / b[-1]["ttft_ms"] for a, b in zip(runs[names[0]], runs[names[1]])])}
    return out


def _shared_prefix(url: str, ckpt_dir: str, clients: int, system_words: int, max_tokens: int) -> dict:
    """`clients` chat requests at once, sharing a system prompt: the prompt tokens the server computed (its
    /metrics) against the least it could, one whole prompt plus every other one's own part."""
    from llama.chat_format import encode_dialog
    from llama.tokenizer import find_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(find_tokenizer(ckpt_dir, None))
    system = {"role": "system", "content": _system_prompt(system_words, seed=1000)}
    rng = random.Random(5)
    dialogs = [[system, {"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(12))}]
               for _ in range(clients)]
    prompts_ = [encode_dialog(tokenizer, d) for d in dialogs]  # the tokenizer's chat format, as the server's
    shared = min(next((k for k, (a, b) in enumerate(zip(p, prompts_[0])) if a != b), len(p)) for p in prompts_[1:])
    least = len(prompts_[0]) + sum(len(p) - shared for p in prompts_[1:])
    before = _metric(url, "llama_prompt_tokens_computed_total")
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)

    async def all_at_once():
        return await asyncio.gather(*(_stream(host, int(port), "/v1/chat/completions",
                                              {"messages": d, "max_tokens": max_tokens}) for d in dialogs))

    asyncio.run(all_at_once())
    computed = _metric(url, "llama_prompt_tokens_computed_total") - before
    return {"clients": clients, "prompt_tokens": sum(map(len, prompts_)), "shared_prefix_tokens": shared,
            "least_computed": least, "computed": computed, "computed / least": computed / least}


def _capacity(ckpt_dir: str, env: dict, scratch: Path, dtype: Optional[str], rows: int, max_seq_len: int,
              kv_cache_tokens: int, tokens: int, long: int) -> dict:
    """A server sized by kv_cache_tokens, not by rows x max_seq_len: `rows` requests of about `tokens` tokens
    all run at once (the most running rows its /metrics shows), and one request of about `long` tokens runs."""
    port = _free_port()
    cmd = [sys.executable, "serve.py", "--port", str(port), "--max_batch_size", str(rows), "--max_seq_len",
           str(max_seq_len), "--kv_cache_tokens", str(kv_cache_tokens), "--nopage", "--ckpt_dir", ckpt_dir]
    cmd += ["--dtype", dtype] if dtype else []
    progress("capacity: " + " ".join(cmd[1:]))
    with _Server(cmd, port, scratch / "capacity.log", env) as server:
        host = "127.0.0.1"
        peak = [0.0]

        async def watch(done: asyncio.Event):
            while not done.is_set():
                running = await asyncio.to_thread(_metric, server.url, "llama_requests_running")
                peak[0] = max(peak[0], running)
                await asyncio.sleep(0.05)

        async def burst():
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(done))
            results = await asyncio.gather(*(_stream(host, port, "/v1/completions", {
                "prompt": prompts(1, seed=i)[0], "max_tokens": tokens}) for i in range(rows)))
            done.set()
            await watcher
            return results

        results = asyncio.run(burst())
        rng = random.Random(3)  # token ids: exactly `long` of them, whatever the tokenizer
        ids = [1] + [rng.randrange(3, 256) for _ in range(long - 1)]
        one = asyncio.run(_stream(host, port, "/v1/completions", {"prompt": ids, "max_tokens": 16}))
        used = one["usage"]["prompt_tokens"] + one["usage"]["completion_tokens"]
        return {"rows": rows, "max_seq_len": max_seq_len, "kv_cache_tokens": kv_cache_tokens,
                "requests": len(results), "completion_tokens": sum(r["tokens"] or 0 for r in results),
                "most_running_at_once": peak[0], "preemptions": _metric(server.url, "llama_preemptions_total"),
                "long_request_tokens": used}


def main(ckpt_dir: Optional[str] = None, shape: Optional[str] = None, dtype: Optional[str] = None,
         clients="1,4,16,64", rounds: int = 1, repeats: int = 3, max_tokens: int = 128, max_seq_len: int = 512,
         compare: Optional[str] = None, hf_dir: Optional[str] = None, threads: Optional[int] = None,
         serial: bool = True, compile: bool = False, tokenizer_path: Optional[str] = None, overhead_rounds: int = 3,
         cache_dir: Optional[str] = None, smoke: bool = False, multiturn: int = 0, shared_prefix: int = 0,
         capacity: bool = False, system_words: int = 300, quantize: Optional[str] = None,
         llamacpp: Optional[str] = None, llamacpp_src: Optional[str] = None, several_models: bool = False,
         load_ckpt_dir: Optional[str] = None, load_shape: Optional[str] = None,
         load_tokenizer_path: Optional[str] = None) -> None:
    if smoke:
        clients, max_tokens, max_seq_len, compare, threads, repeats = (1, 4), 16, 128, None, 1, 1
    levels = [int(c) for c in (clients if isinstance(clients, (list, tuple)) else str(clients).split(","))]
    if compare not in (None, "hf", "llamacpp"):
        raise ValueError(f"--compare {compare!r}: compare with 'hf' (transformers serve) or 'llamacpp' (llama-server)")
    cpp = None
    if compare == "llamacpp":  # the build is checked before anything loads
        from llamacpp import LlamaCpp

        cpp = LlamaCpp(llamacpp, llamacpp_src)
    scratch = tempfile.TemporaryDirectory(prefix="llama-load-")
    import torch

    from benchmark import DEFAULT_CACHE, synthetic_checkpoint
    from llama.distributed import resolve_dtype

    if shape is not None:
        ckpt_dir = str(synthetic_checkpoint(shape, resolve_dtype(dtype, torch.device("cpu")),
                                            Path(cache_dir) if cache_dir else DEFAULT_CACHE))
    if ckpt_dir is None:  # the demo model, which the server and this process must share
        from llama.tiny import make_tiny_checkpoint

        ckpt_dir = str(make_tiny_checkpoint(Path(scratch.name) / "tiny"))
    if tokenizer_path is not None:
        ckpt_dir = _with_tokenizer(ckpt_dir, tokenizer_path, Path(scratch.name) / "ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    report: dict = {"config": dict(ckpt_dir=ckpt_dir, dtype=dtype, compile=compile, clients=levels, rounds=rounds,
                                   repeats=repeats, max_tokens=max_tokens, threads=threads, cpus=os.cpu_count())}
    port = _free_port()
    cmd = [sys.executable, "serve.py", "--port", str(port), "--max_batch_size", str(max(levels)), "--max_seq_len",
           str(max_seq_len), "--max_queue", "4096", "--nopage", "--ckpt_dir", ckpt_dir]
    cmd += ["--dtype", dtype] if dtype else []
    cmd += ["--quantize", quantize] if quantize else []
    cmd += ["--compile"] if compile else []
    if several_models:
        if load_shape is not None:
            load_ckpt_dir = str(synthetic_checkpoint(load_shape, resolve_dtype(dtype, torch.device("cpu")),
                                                     Path(cache_dir) if cache_dir else DEFAULT_CACHE))
        if load_tokenizer_path is not None:
            load_ckpt_dir = _with_tokenizer(load_ckpt_dir, load_tokenizer_path, Path(scratch.name) / "load")
        report["several_models"] = _several_models(cmd, ckpt_dir, load_ckpt_dir, env, Path(scratch.name), max(levels),
                                                   max_tokens, repeats)
        print(json.dumps(report, indent=2))
        return
    if multiturn or shared_prefix or capacity:
        report["prefix_cache"] = _cache_checks(cmd, ckpt_dir, env, Path(scratch.name), dtype, multiturn, shared_prefix,
                                               capacity, repeats, system_words)
        print(json.dumps(report, indent=2))
        return
    with contextlib.ExitStack() as stack:
        progress("ours: " + " ".join(cmd[1:]))
        servers = {"ours": stack.enter_context(_Server(cmd, port, Path(scratch.name) / "ours.log", env))}
        models = {"ours": httpx.get(servers["ours"].url + "/v1/models").json()["data"][0]["id"]}
        if compare == "hf":
            hf_dir = hf_dir or _hf_folder(ckpt_dir, Path(scratch.name) / "hf", env)
            port = _free_port()
            progress("transformers: serve " + hf_dir)
            servers["hf"] = stack.enter_context(_Server(_hf_command(hf_dir, port, levels, max_seq_len, dtype), port,
                                                        Path(scratch.name) / "hf.log", env))
            models["hf"] = hf_dir
        if cpp is not None:
            gguf = _gguf(cpp, ckpt_dir, dtype, quantize, Path(cache_dir) if cache_dir else None, Path(scratch.name))
            port = _free_port()
            command = [cpp.tool("llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                       "-np", str(max(levels)), "-c", str(max(levels) * max_seq_len), "-t", str(threads or os.cpu_count())]
            progress("llama.cpp: " + " ".join(command))
            servers["llamacpp"] = stack.enter_context(_Server(command, port, Path(scratch.name) / "llamacpp.log",
                                                              {**env, **cpp._env()}))
            models["llamacpp"] = "model"
        report["levels"] = _compare(servers, models, levels, rounds, repeats, max_tokens, serial)
        if overhead_rounds:
            progress("one stream over HTTP and the same in this process, in turns, for the HTTP overhead")
            report["overhead"] = _overhead(servers["ours"].url, models["ours"], ckpt_dir, dtype, max_seq_len,
                                           max_tokens, threads, compile, overhead_rounds)
    print(json.dumps(report, indent=2))


def _gguf(cpp, ckpt_dir: str, dtype: Optional[str], quantize: Optional[str], cache_dir: Optional[Path],
          scratch: Path) -> Path:
    """The checkpoint as llama.cpp reads it, in the weight type that matches ours (bf16 -> BF16, int8 -> Q8_0,
    int4 -> Q4_0), converted once through our Hugging Face export."""
    from llamacpp import GGUF_TYPES, hf_export

    float_type = GGUF_TYPES[{"bfloat16": "bf16", None: "float32"}.get(dtype, dtype)]
    weight_type = GGUF_TYPES[quantize] if quantize else float_type
    base = (cache_dir or scratch) / (Path(ckpt_dir, "params.json").resolve().parent.name + "-load")
    hf = hf_export(ckpt_dir, base.with_name(base.name + "-hf"))
    return cpp.gguf(hf, base.with_name(base.name + "-gguf"), weight_type, float_type)


def _cache_checks(cmd: List[str], ckpt_dir: str, env: dict, scratch: Path, dtype: Optional[str], multiturn: int,
                  shared_prefix: int, capacity: bool, repeats: int, system_words: int) -> dict:
    """--multiturn (against the same server with --noprefix_cache, both up at once), --shared_prefix and
    --capacity (a server of its own, sized by --kv_cache_tokens)."""
    out: dict = {}
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(_Server(cmd, int(cmd[cmd.index("--port") + 1]), scratch / "ours.log",
                                                       env))}
        if multiturn:
            port = _free_port()
            plain = cmd[:cmd.index("--port") + 1] + [str(port)] + cmd[cmd.index("--port") + 2:] + ["--noprefix_cache"]
            servers["ours --noprefix_cache"] = stack.enter_context(_Server(plain, port, scratch / "plain.log", env))
            out["multiturn"] = _multiturn(servers, multiturn, repeats, 32, system_words)
        if shared_prefix:
            out["shared_prefix"] = _shared_prefix(servers["ours"].url, ckpt_dir, shared_prefix, system_words, 16)
    if capacity:
        out["capacity"] = _capacity(ckpt_dir, env, scratch, dtype, rows=64, max_seq_len=2048, kv_cache_tokens=16384,
                                    tokens=100, long=1984)
    return out


# Several models in one server.

def _with_cmd(cmd: List[str], port: int, models: List[str], extra: List[str] = ()) -> List[str]:
    """`cmd` on `port`, serving `models` (NAME=DIR each) rather than its --ckpt_dir."""
    out = list(cmd)
    out[out.index("--port") + 1] = str(port)
    at = out.index("--ckpt_dir")
    del out[at:at + 2]
    return out + [w for m in models for w in ("--model", m)] + list(extra)


def _greedy_texts(url: str, model: str, texts: List[str], max_tokens: int) -> List[str]:
    return asyncio.run(_level(url, model, texts, len(texts), max_tokens))["texts"]


def _several_models(cmd: List[str], ckpt_dir: str, load_ckpt_dir: Optional[str], env: dict, scratch: Path,
                    clients: int, max_tokens: int, repeats: int) -> dict:
    from llama.tiny import make_tiny_checkpoint

    params = json.loads((Path(ckpt_dir) / "params.json").read_text()) if (Path(ckpt_dir) / "params.json").exists() \
        else None
    other = str(make_tiny_checkpoint(scratch / "b", seed=1, params=params)) if params else ckpt_dir
    out: dict = {}
    texts = prompts(clients, seed=11)
    # Equal answers, and concurrent traffic to both models losing nothing.
    singles = {}
    for name, folder in (("a", ckpt_dir), ("b", other)):
        port = _free_port()
        one = list(cmd)
        one[one.index("--port") + 1] = str(port)
        one[one.index("--ckpt_dir") + 1] = folder
        with _Server(one + ["--model_name", name], port, scratch / f"single-{name}.log", env) as server:
            progress(f"{name} alone: {len(texts)} greedy requests")
            singles[name] = _greedy_texts(server.url, name, texts, max_tokens)
    port = _free_port()
    with _Server(_with_cmd(cmd, port, [f"a={ckpt_dir}", f"b={other}"]), port, scratch / "both.log", env) as server:
        progress(f"a and b in one server: {len(texts)} greedy requests each, then {clients} clients on each at once")
        same = {name: _greedy_texts(server.url, name, texts, max_tokens) == singles[name] for name in "ab"}

        async def both():
            return await asyncio.gather(*(_level(server.url, name, texts, clients, max_tokens) for name in "ab"))

        start = time.perf_counter()
        runs = asyncio.run(both())
        wall = time.perf_counter() - start
        out["two_models"] = {
            "same_greedy_texts_as_alone": same,
            "concurrent": {"requests": 2 * len(texts), "answered": sum(len(r["texts"]) for r in runs),
                           "same_texts_as_alone": all(r["texts"] == singles[n] for n, r in zip("ab", runs)),
                           "tokens": sum(r["tokens"] for r in runs), "wall_s": wall,
                           "tok_s": sum(r["tokens"] for r in runs) / wall,
                           "per_model_tok_s": {n: r["tok_s"] for n, r in zip("ab", runs)}}}
    # Loading on demand while another model streams.
    load = load_ckpt_dir or other
    port = _free_port()
    demand = _with_cmd(cmd, port, [f"a={ckpt_dir}", f"b={load}", f"c={load}"],
                       ["--max_loaded", "2", "--stream_interval", "0"])
    samples = []
    from llama.tokenizer import find_tokenizer, load_tokenizer

    no_stop = {str(t): -100 for t in load_tokenizer(find_tokenizer(ckpt_dir, None)).stop_ids}  # a streams throughout
    with _Server(demand, port, scratch / "demand.log", env) as server:
        host = "127.0.0.1"
        _greedy_texts(server.url, "a", texts[:1], 4)  # a loads
        for r in range(repeats):
            target = "bc"[r % 2]
            progress(f"a streams while {target} loads ({r + 1}/{repeats})")

            async def during():
                done, streams = asyncio.Event(), []

                async def keep_streaming():  # a's streams back to back until the other model has answered
                    while not done.is_set():
                        streams.append(await _stream(host, port, "/v1/completions", {
                            "model": "a", "prompt": texts[0], "max_tokens": max_tokens, "logit_bias": no_stop}))

                streaming = asyncio.create_task(keep_streaming())
                await asyncio.sleep(5.0)  # the gaps before the load, to compare with
                sent = time.perf_counter()
                first = await _stream(host, port, "/v1/completions", {"model": target, "prompt": texts[1],
                                                                       "max_tokens": 8})
                await asyncio.sleep(1.0)
                done.set()
                await streaming
                return streams, sent, first

            streams, sent, first = asyncio.run(during())
            answered = first["arrivals"][0] if first["arrivals"] else float("nan")
            gaps = [(t, t - s) for a in streams for s, t in zip(a["arrivals"], a["arrivals"][1:])]
            status = httpx.get(server.url + "/health").json()["models"][target]
            samples.append({"model": target, "load_s": status["load_s"], "first_request_s": answered - sent,
                            "a_streams": len(streams), "a_tokens": sum(a["tokens"] or 0 for a in streams),
                            "a_gaps_before_ms": _gap_stats([g for t, g in gaps if t < sent]),
                            "a_gaps_during_load_ms": _gap_stats([g for t, g in gaps if sent <= t <= answered]),
                            "a_ttft_during_load_ms": [(a["arrivals"][0] - a["sent"]) * 1e3 for a in streams
                                                      if a["arrivals"] and sent <= a["arrivals"][0] <= answered]})
    out["load_on_demand"] = {"loads": samples, "load_ckpt_dir": load,
                             "median_load_s": statistics.median(s["load_s"] for s in samples),
                             "median_gap_p99_ms": {k: statistics.median(s[f"a_gaps_{k}_ms"]["p99"] for s in samples)
                                                   for k in ("before", "during_load")},
                             "largest_gap_during_loads_ms": max(s["a_gaps_during_load_ms"]["max"] for s in samples)}
    return out


def _gap_stats(gaps: List[float]) -> dict:
    return {"n": len(gaps), "p50": _quantile(gaps, 0.5) * 1e3, "p99": _quantile(gaps, 0.99) * 1e3,
            "max": max(gaps, default=float("nan")) * 1e3}


def _hf_folder(ckpt_dir: str, out: Path, env: dict) -> str:
    progress(f"writing the Hugging Face folder {out}")
    subprocess.run([sys.executable, "scripts/convert_checkpoint.py", ckpt_dir, str(out), "--to", "hf"], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    return str(out)


def _hf_command(hf_dir: str, port: int, levels: List[int], max_seq_len: int, dtype: Optional[str]) -> List[str]:
    """transformers serve with continuous batching, its paged cache sized for every client's longest request
    (the default is sized for a GPU)."""
    blocks = max(levels) * (max_seq_len + 32) // 32 + 1
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", hf_dir, "--host", "127.0.0.1", "--port",
           str(port), "--device", "cpu", "--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks",
           str(blocks), "--cb-max-batch-tokens", "256"]
    hf_dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return cmd + (["--dtype", hf_dtypes.get(dtype, dtype)] if dtype else [])


if __name__ == "__main__":
    from llama import cli

    sys.exit(cli.run(main, more_errors=(RuntimeError,)))
