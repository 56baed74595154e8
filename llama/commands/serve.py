"""`llama-serve`: serve a LLaMA checkpoint over HTTP, an OpenAI-compatible API and a Gradio page, on one
process or N.

    llama-serve                                         # the tiny random-weight demo model
    llama-serve --ckpt_dir D [--port 8000] [--api_key KEY] ...
    torchrun --nproc_per_node N -m llama.serve --ckpt_dir D ...

`python -m llama.serve` and `serve.py` at the top of the repository are the same command. It needs the
`serve` extra (pip install 'llama[serve]'). Rank 0 listens at once (/health answers 503 until the model is
loaded) and drives the engine; ranks > 0 follow its steps. SIGINT or SIGTERM on rank 0 stops the server:
requests in flight end (finish_reason "length"), every rank exits 0. Ranks > 0 ignore both signals and end
when rank 0 tells them to, or with an error when it is gone. An engine failure (a rank died) exits 1.
"""
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from llama import cli

log = logging.getLogger("llama.serve")
DEMO_NAME = "llama-tiny-demo"


def main(
    ckpt_dir: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 16,
    max_queue: int = 256,
    max_body_bytes: int = 1 << 20,
    max_connections: int = 1000,
    stream_interval: float = 0.02,
    cors: bool = False,
    page: bool = True,
    tokenizer_path: Optional[str] = None,
    chat_format: Optional[str] = None,
    seed: int = 1,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    prefill_chunk: int = 128,
    lora: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
) -> None:
    """Serve a LLaMA checkpoint over HTTP: an OpenAI-compatible API at /v1 (completions, chat completions,
    models), a web page at /, /health and /metrics. Every request, from the API or the page, goes to one
    engine, so concurrent users batch together. Without --ckpt_dir, the tiny demo model (gibberish by design).

    Args:
        ckpt_dir: the checkpoint folder (Meta or Hugging Face layout). Without it: the tiny demo model.
        host: the address to listen on; 127.0.0.1 is this machine only, 0.0.0.0 every interface (use an
            --api_key).
        port: the port to listen on; 0 picks a free one.
        api_key: the key every /v1 request and /metrics must send (Authorization: Bearer KEY), and the page's
            password; default: the environment variable LLAMA_API_KEY, else none.
        model_name: the model's name in the API; default: the checkpoint folder's name.
        max_seq_len: prompt plus answer, in tokens; default: the checkpoint's own context (2048 when it
            states none). Longer requests get a 400.
        max_batch_size: requests running at once, sharing each step.
        max_queue: requests that may wait for a slot; beyond that a request gets 429.
        max_body_bytes: the largest request body accepted (413 beyond).
        max_connections: open connections at most; beyond them a new one gets 503 and is closed.
        stream_interval: seconds between a stream's chunks, at least (0: a chunk per step).
        cors: allow every web origin to call the API (browsers then let any page use it; use an --api_key).
        page: serve the web page at / (--nopage: the API alone).
        tokenizer_path: the tokenizer file; default: the checkpoint folder's.
        chat_format: llama2, llama3 or alpaca; default: the tokenizer's.
        seed: the seed drawn from for requests that give none.
        model_parallel_size: processes the model is split over; default: all of torchrun's.
        device: cpu, cuda or cuda:N; default: this rank's GPU when there is one, else cpu.
        dtype: float32, bf16 or fp16; default: bf16 (fp16 where unsupported) on a GPU, float32 on a CPU.
        compile: compile the decode step with torch.compile, every bucket before the server reports ready.
        quantize: int8 or int4 weights, quantized as they load.
        group_size: int4's group size: 32, 64, 128 or 256.
        prefill_chunk: prompt tokens prefilled per step, at most (a long prompt holds streams up one chunk
            at a time).
        lora: a PEFT LoRA adapter folder, merged into the weights as they load.
        kv_cache_tokens: positions of the paged KV cache, all requests together; default: max_batch_size x
            max_seq_len, or what fits in memory (requests beyond what it holds wait, or are preempted).
        prefix_cache: reuse the keys and values of a prompt's start that an earlier request shared (a chat's
            history, a system prompt); --noprefix_cache turns it off.
    """
    from llama.errors import check_positive_int
    from llama.loading import checkpoint_context, resolve_max_seq_len

    api_key = os.environ.get("LLAMA_API_KEY") if api_key is None else api_key
    check_server_flags(host, port, max_queue, max_body_bytes, stream_interval, api_key)
    check_positive_int("max_connections", max_connections)
    name = model_name if model_name is not None else Path(ckpt_dir).name if ckpt_dir else DEMO_NAME
    # Known before the model loads: the page and /v1/models are up while it does.
    if max_seq_len is None:
        max_seq_len = resolve_max_seq_len(None, checkpoint_context(ckpt_dir) if ckpt_dir else None)

    def build():
        from llama import Llama

        with cli.checkpoint_or_demo(ckpt_dir) as path:
            g = Llama.build(
                ckpt_dir=path, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                model_parallel_size=model_parallel_size, seed=seed, device=device, dtype=dtype, compile=compile,
                quantize=quantize, group_size=group_size, prefill_chunk=prefill_chunk, lora=lora,
                chat_format=chat_format, kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache)
        if compile:  # before serving: a compilation in mid-service would stall every stream
            log.info("compiling the decode step for every bucket of rows and keys")
            log.info("compiled %d buckets", g.compile_all())
        return g

    if not cli.is_rank0():
        follow(build())
        return
    from llama.serve import ServeConfig, Service
    from llama.serve.server import bind, serve_rank0

    sock = bind(host, port)  # before loading: a busy port fails at once
    service = Service(name, max_seq_len, max_queue, stream_interval)
    config = ServeConfig(api_key=api_key, cors=cors, max_body_bytes=max_body_bytes, page=page,
                         max_connections=max_connections)
    serve_rank0(build, service, config, sock)


def check_server_flags(host: str, port: int, max_queue: int, max_body_bytes: int, stream_interval: float,
                       api_key: Optional[str]) -> None:
    from llama.errors import check_positive_int

    if not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} must be an integer from 0 to 65535 (0: any free port)")
    if max_queue < 0:
        raise ValueError(f"max_queue={max_queue!r} must be an integer >= 0 (requests that may wait for a slot)")
    check_positive_int("max_body_bytes", max_body_bytes)
    if not 0 <= stream_interval <= 1:
        raise ValueError(f"stream_interval={stream_interval!r} must be seconds from 0 to 1 (0: a chunk per step)")
    from llama.serve.app import check_api_key

    check_api_key(api_key)  # e.g. empty, or not ASCII (which HTTP clients cannot send)
    if not host:
        raise ValueError("host is empty: pass e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")


def follow(g) -> None:
    """Ranks > 0: run rank 0's steps until it shuts down. Signals are rank 0's to act on: a Ctrl-C in
    the terminal reaches every rank, and this one must keep following until rank 0 has ended the
    requests in flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        g.serve_forever()
    except Exception as e:  # noqa: BLE001 - rank 0 is gone, or a step failed
        log.error("rank %s: the engine stopped: %s: %s", os.environ.get("RANK", "0"), type(e).__name__, e)
        raise SystemExit(1) from None


def run(argv: Optional[Sequence[str]] = None, prog: str = "llama-serve") -> int:
    return cli.run(main, argv, prog)


if __name__ == "__main__":
    sys.exit(run())
