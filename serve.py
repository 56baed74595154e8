"""Serve a LLaMA checkpoint over HTTP: an OpenAI-compatible API and a Gradio page, on one process or N.

    python serve.py --ckpt_dir D [--tokenizer_path T] [--host 127.0.0.1] [--port 8000] [--max_batch_size 16] \
        [--max_seq_len 2048] [--api_key KEY] [--model_name NAME] [--max_queue 256] [--cors] [--nopage] \
        [--max_body_bytes 1048576] [--max_connections 1000] [--stream_interval 0.02] [--device cpu] [--dtype bf16] \
        [--compile] [--quantize int8] [--seed 1] [--lora ADAPTER] [--chat_format {llama2,llama3,alpaca}] \
        [--prefill_chunk 128] [--kv_cache_tokens N] [--noprefix_cache]
    torchrun --nproc_per_node N serve.py --ckpt_dir D ...
    python serve.py                 # no --ckpt_dir: the tiny random-weight demo model

Needs the `serve` extra (pip install -e ".[serve]"). Rank 0 listens (at once: /health answers 503
until the model is loaded) and drives the engine; ranks > 0 follow its steps. The API key may also
come from the environment variable LLAMA_API_KEY. SIGINT or SIGTERM on rank 0 stops the server:
requests in flight end (finish_reason "length"), every rank exits 0. Ranks > 0 ignore both signals
and end when rank 0 tells them to, or with an error when it is gone. A bad flag or file ends every
rank with a one-line error and exit status 1; an engine failure (a rank died) with status 1.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

from example import DEMO_WARNING, run_cli
from llama import Llama
from llama.distributed import env_rank
from llama.errors import check_positive_int

log = logging.getLogger("serve")
DEMO_NAME = "llama-tiny-demo"


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_seq_len: int = 2048,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    max_queue: int = 256,
    cors: bool = False,
    page: bool = True,
    max_body_bytes: int = 1 << 20,
    max_connections: int = 1000,
    stream_interval: float = 0.02,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    prefill_chunk: int = 128,
    lora: Optional[str] = None,
    chat_format: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
) -> None:
    api_key = os.environ.get("LLAMA_API_KEY") if api_key is None else str(api_key)
    check_server_flags(str(host), port, max_queue, max_body_bytes, stream_interval, api_key)
    check_positive_int("max_connections", max_connections)
    name = str(model_name) if model_name is not None else Path(str(ckpt_dir)).name if ckpt_dir else DEMO_NAME

    def build() -> Llama:
        with tempfile.TemporaryDirectory(prefix="llama-demo-") as scratch:
            path = ckpt_dir
            if path is None:
                from llama.tiny import make_tiny_checkpoint

                log.warning(DEMO_WARNING)
                path = make_tiny_checkpoint(os.path.join(scratch, "tiny"))
            g = Llama.build(
                ckpt_dir=str(path), tokenizer_path=str(tokenizer_path) if tokenizer_path else None,
                max_seq_len=max_seq_len, max_batch_size=max_batch_size, model_parallel_size=model_parallel_size,
                seed=seed, device=device, dtype=dtype, compile=compile, quantize=quantize,
                prefill_chunk=prefill_chunk, lora=None if lora is None else str(lora), chat_format=chat_format,
                kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache)
            if compile:  # before serving: a compilation in mid-service would stall every stream
                log.info("compiling the decode step for every bucket of rows and keys")
                log.info("compiled %d buckets", g.compile_all())
            return g

    if env_rank() != 0:
        follow(build())
        return
    from llama.serve import ServeConfig, Service
    from llama.serve.server import bind, serve_rank0

    sock = bind(str(host), port)  # before loading: a busy port fails at once
    service = Service(name, max_seq_len, max_queue, float(stream_interval))
    config = ServeConfig(api_key=api_key, cors=bool(cors), max_body_bytes=max_body_bytes, page=bool(page),
                         max_connections=max_connections)
    serve_rank0(build, service, config, sock)


def check_server_flags(host: str, port, max_queue, max_body_bytes, stream_interval, api_key: Optional[str]) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} must be an integer from 0 to 65535 (0: any free port)")
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
        raise ValueError(f"max_queue={max_queue!r} must be an integer >= 0 (requests that may wait for a slot)")
    check_positive_int("max_body_bytes", max_body_bytes)
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, (int, float)) \
            or not 0 <= stream_interval <= 1:
        raise ValueError(f"stream_interval={stream_interval!r} must be seconds from 0 to 1 (0: a chunk per step)")
    from llama.serve.app import check_api_key

    check_api_key(api_key)  # e.g. a non-ASCII key, which HTTP clients cannot send
    if not host:
        raise ValueError("host is empty: pass e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")


def follow(g: Llama) -> None:
    """Ranks > 0: run rank 0's steps until it shuts down. Signals are rank 0's to act on: a Ctrl-C in
    the terminal reaches every rank, and this one must keep following until rank 0 has ended the
    requests in flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        g.serve_forever()
    except Exception as e:  # noqa: BLE001 - rank 0 is gone, or a step failed
        log.error("rank %d: the engine stopped: %s: %s", env_rank(), type(e).__name__, e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
