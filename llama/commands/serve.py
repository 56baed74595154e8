"""`llama-serve`: serve LLaMA checkpoints over HTTP, an OpenAI-compatible API and a Gradio page, on one
process or N.

    llama-serve                                         # the tiny random-weight demo model
    llama-serve --ckpt_dir D [--port 8000] [--api_key KEY] ...
    llama-serve --model a=DIR_A --model b=DIR_B [--max_loaded 1 | --memory_gb 24]
    llama-serve --models models.toml                    # several models, each with its own options
    llama-serve --ckpt_dir D --lora sql=ADAPTER_DIR     # an unmerged adapter: requests for model "sql"
    torchrun --nproc_per_node N -m llama.serve --ckpt_dir D ...

`python -m llama.serve` and `serve.py` at the top of the repository are the same command. It needs the
`serve` extra (pip install 'llama[serve]'). Rank 0 listens at once (/health answers 503 until the models
that load at start are loaded) and drives the engines; ranks > 0 follow its steps. SIGINT or SIGTERM on
rank 0 stops the server: requests in flight end (finish_reason "length"), every rank exits 0. Ranks > 0
ignore both signals and end when rank 0 tells them to, or with an error when it is gone. An engine
failure (a rank died) exits 1.

A models file (--models) is TOML, a table per model under `models`; relative paths are the file's:

    [models.stories]
    ckpt_dir = "stories15M"
    max_seq_len = 256
    [models.tiny]
    ckpt_dir = "/data/tiny"
    quantize = "int8"
    adapters = { sql = "/data/sql-lora" }   # unmerged LoRA adapters: requests for model "sql" or "tiny:sql"

A model takes ckpt_dir (required), tokenizer_path, dtype, quantize, group_size, lora (merged), adapters
(unmerged), chat_format, max_seq_len, max_batch_size, kv_cache_tokens, prefix_cache, prefill_chunk, compile
and seed; the command's flags of those names are every model's defaults.
"""
import logging
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional, Sequence

from llama import cli

log = logging.getLogger("llama.serve")
DEMO_NAME = "llama-tiny-demo"
DEMO_DESCRIPTION = ("This is a tiny demo model with random weights: its text is gibberish by design. To chat with a "
                    "real model, start the server with --ckpt_dir and a checkpoint folder (e.g. one made by "
                    "python -m llama.download stories15M).")
# What each model of a models file may set (its own value of the command's flag of that name), with its type.
MODEL_OPTIONS = {"ckpt_dir": str, "tokenizer_path": str, "dtype": str, "quantize": str, "group_size": int,
                 "lora": str, "adapters": dict, "chat_format": str, "max_seq_len": int, "max_batch_size": int,
                 "kv_cache_tokens": int, "prefix_cache": bool, "prefill_chunk": int, "compile": bool, "seed": int}


def main(
    ckpt_dir: Optional[str] = None,
    model: Optional[List[str]] = None,
    models: Optional[str] = None,
    max_loaded: Optional[int] = None,
    memory_gb: Optional[float] = None,
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
    lora: Optional[List[str]] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
) -> None:
    """Serve LLaMA checkpoints over HTTP: an OpenAI-compatible API at /v1 (completions, chat completions,
    models, LoRA adapter loading), a web page at /, /health and /metrics. Every request, from the API or the
    page, goes to its model's engine, so concurrent users of a model batch together; each model has an
    engine of its own. Without --ckpt_dir, --model or --models, the tiny demo model (gibberish by design).

    Args:
        ckpt_dir: the checkpoint folder (Meta or Hugging Face layout), served alone. Without it, --model or
            --models: the tiny demo model.
        model: NAME=DIR, a model to serve under NAME (a request's "model" chooses it); repeat it for several
            (--model a=DIR_A --model b=DIR_B). The first is the default of requests that name none.
        models: a TOML file naming several models, each with its own options (see the command's docs:
            llama-serve --help, docs/serving.md).
        max_loaded: models loaded at once, at most: the others load on first use, and the least recently
            used idle model is unloaded to make room. Default: no limit (every model loads at start).
        memory_gb: GiB of weights and KV cache that the loaded models may hold together (this rank's share),
            at most; as --max_loaded, models then load on first use. A budget too small for the largest
            model alone is refused.
        host: the address to listen on; 127.0.0.1 is this machine only, 0.0.0.0 every interface (use an
            --api_key).
        port: the port to listen on; 0 picks a free one.
        api_key: the key every /v1 request and /metrics must send (Authorization: Bearer KEY), and the page's
            password; default: the environment variable LLAMA_API_KEY, else none.
        model_name: the name of the --ckpt_dir model in the API; default: the checkpoint folder's name.
        max_seq_len: prompt plus answer, in tokens; default: the checkpoint's own context (2048 when it
            states none). Longer requests get a 400.
        max_batch_size: requests running at once on a model, sharing each step.
        max_queue: requests that may wait for a slot of a model; beyond that a request gets 429.
        max_body_bytes: the largest request body accepted (413 beyond).
        max_connections: open connections at most; beyond them a new one gets 503 and is closed.
        stream_interval: seconds between a stream's chunks, at least (0: a chunk per step).
        cors: allow every web origin to call the API (browsers then let any page use it; use an --api_key).
        page: serve the web page at / (--nopage: the API alone).
        tokenizer_path: the tokenizer file; default: the checkpoint folder's.
        chat_format: llama2, llama3 or alpaca; default: the tokenizer's.
        seed: the seed drawn from for requests that give none.
        model_parallel_size: processes each model is split over; default: all of torchrun's.
        device: cpu, cuda or cuda:N; default: this rank's GPU when there is one, else cpu.
        dtype: float32, bf16 or fp16; default: bf16 (fp16 where unsupported) on a GPU, float32 on a CPU.
        compile: compile the decode step with torch.compile, every bucket before the model serves.
        quantize: int8 or int4 weights, quantized as they load.
        group_size: int4's group size: 32, 64, 128 or 256.
        prefill_chunk: prompt tokens prefilled per step, at most (a long prompt holds streams up one chunk
            at a time).
        lora: a PEFT LoRA adapter: DIR alone is merged into the weights as they load (one model served);
            NAME=DIR (or BASE:NAME=DIR, with several models) is kept unmerged beside the base, for the
            requests whose model is NAME (or BASE:NAME); repeat it for several.
        kv_cache_tokens: positions of a model's paged KV cache, all its requests together; default:
            max_batch_size x max_seq_len, or what fits in memory (requests beyond what it holds wait, or are
            preempted).
        prefix_cache: reuse the keys and values of a prompt's start that an earlier request shared (a chat's
            history, a system prompt); --noprefix_cache turns it off.
    """
    from llama.pool import ModelPool

    api_key = os.environ.get("LLAMA_API_KEY") if api_key is None else api_key
    check_server_flags(host, port, max_queue, max_body_bytes, stream_interval, api_key)
    from llama.errors import check_positive_int

    check_positive_int("max_connections", max_connections)
    if max_loaded is not None:
        check_positive_int("max_loaded", max_loaded)
    if memory_gb is not None and not (isinstance(memory_gb, (int, float)) and memory_gb > 0):
        raise ValueError(f"memory_gb={memory_gb!r} must be a positive number of GiB")
    defaults = dict(tokenizer_path=tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                    model_parallel_size=model_parallel_size, seed=seed, device=device, dtype=dtype, compile=compile,
                    quantize=quantize, group_size=group_size, prefill_chunk=prefill_chunk, chat_format=chat_format,
                    kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache)
    with ExitStack() as stack:
        entries = model_entries(ckpt_dir, model, models, model_name, lora, stack)
        specs = model_specs(entries, defaults, memory_gb is not None)
        pool = ModelPool(specs, max_loaded=max_loaded,
                         memory_bytes=None if memory_gb is None else int(memory_gb * 2**30))
        if not cli.is_rank0():
            follow(pool)
            return
        from llama.serve import ServeConfig, Service
        from llama.serve.server import bind, serve_rank0

        sock = bind(host, port)  # before loading: a busy port fails at once
        service = Service(pool, max_queue, stream_interval)
        config = ServeConfig(api_key=api_key, cors=cors, max_body_bytes=max_body_bytes, page=page,
                             max_connections=max_connections)
        serve_rank0(service, config, sock)


def model_entries(ckpt_dir: Optional[str], model: Optional[List[str]], models: Optional[str],
                  model_name: Optional[str], lora: Optional[List[str]], stack: ExitStack) -> List[dict]:
    """The models to serve, in order: {"name", "ckpt_dir", options..., "adapters": {name: dir}}, from
    --ckpt_dir (or the demo), --model and --models, with --lora's adapters; refused here (before anything
    loads) when names clash or a flag contradicts another."""
    from llama.pool import check_names

    if ckpt_dir is not None and (model or models):
        raise ValueError("ckpt_dir serves one model: with --model or --models, name it there too (--model "
                         f"NAME={ckpt_dir})")
    if model_name is not None and (model or models):
        raise ValueError("model_name names the --ckpt_dir model: with --model or --models, each model's name comes "
                         "before its '=' (--model NAME=DIR) or is its table's name")
    entries: List[dict] = []
    for item in model or []:
        name, eq, folder = item.partition("=")
        if not eq or not name or not folder:
            raise ValueError(f"model={item!r} must be NAME=DIR: a name for requests to choose the model by, and its "
                             "checkpoint folder")
        entries.append({"name": name, "ckpt_dir": folder})
    if models is not None:
        entries += read_models_file(models)
    if not entries:
        folder = ckpt_dir if ckpt_dir is not None else stack.enter_context(cli.checkpoint_or_demo(None))
        name = model_name if model_name is not None else Path(ckpt_dir).name if ckpt_dir else DEMO_NAME
        entries.append({"name": name, "ckpt_dir": folder, "demo": ckpt_dir is None})
    check_names([e["name"] for e in entries])
    for e in entries:
        e.setdefault("adapters", {})
    merged = [item for item in lora or [] if "=" not in item]
    if merged:
        if len(merged) > 1 or len(entries) > 1:
            raise ValueError("lora=DIR merges one adapter into the one model served: with several models give each "
                             "its own (a models file's lora = DIR), or keep adapters unmerged with --lora NAME=DIR")
        entries[0]["lora"] = merged[0]
    for item in lora or []:
        if "=" not in item:
            continue
        key, _, folder = item.partition("=")
        base, colon, name = key.rpartition(":")
        if not colon:
            if len(entries) > 1:
                raise ValueError(f"lora={item!r}: this server serves several models; name the adapter's base: "
                                 f"--lora BASE:{key}={folder}")
            base = entries[0]["name"]
        owner = next((e for e in entries if e["name"] == base), None)
        if owner is None:
            raise ValueError(f"lora={item!r} names model {base!r}, which is not served (the models: "
                             f"{', '.join(repr(e['name']) for e in entries)})")
        if not name or not folder:
            raise ValueError(f"lora={item!r} must be NAME=DIR (or BASE:NAME=DIR)")
        owner["adapters"][name] = folder
    adapters = [a for e in entries for a in e["adapters"]]
    check_names([e["name"] for e in entries] + adapters)  # an adapter's name is a model name to requests too
    return entries


def read_models_file(path: str) -> List[dict]:
    """The models of a TOML models file (see the module's docs), relative paths made the file's."""
    import tomllib

    file = Path(path)
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"models file {path!r} does not exist: pass --models with a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"models file {path}: not valid TOML ({e})") from None
    extra = sorted(set(data) - {"models"})
    if extra or not isinstance(data.get("models"), dict) or not data["models"]:
        raise ValueError(f"models file {path}: it must hold a [models.NAME] table per model, and nothing else"
                         + (f" (found {', '.join(extra)})" if extra else ""))
    entries = []
    kinds = {str: "string", int: "integer", bool: "boolean", dict: "table"}
    for name, options in data["models"].items():
        where = f"models file {path}: models.{name}"  # TOML's dotted keys (which the error line keeps as they are)
        if not isinstance(options, dict):
            raise ValueError(f"{where} must be a table of options ([models.{name}] then ckpt_dir = ...)")
        unknown = sorted(set(options) - set(MODEL_OPTIONS))
        if unknown:
            flags = ", ".join(f"--{k}" for k in MODEL_OPTIONS if k != "adapters")
            raise ValueError(f"{where}.{unknown[0]} is not an option of a model; a model takes those of the flags "
                             f"{flags}, and adapters (a table of unmerged LoRA adapters)")
        if "ckpt_dir" not in options:
            raise ValueError(f"{where}.ckpt_dir is missing: the model's checkpoint folder")
        for key, value in options.items():
            kind = MODEL_OPTIONS[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{where}.{key} must be a TOML {kinds[kind]}, not {value!r}")
        entry = {"name": name, **options, "adapters": dict(options.get("adapters", {}))}
        for key in ("ckpt_dir", "tokenizer_path", "lora"):
            if key in entry:
                entry[key] = str(file.parent / entry[key])
        for adapter, folder in entry["adapters"].items():
            if not isinstance(folder, str):
                raise ValueError(f"{where}.adapters.{adapter} must be a folder path, not {folder!r}")
            entry["adapters"][adapter] = str(file.parent / folder)
        entries.append(entry)
    return entries


def model_specs(entries: List[dict], defaults: dict, estimate: bool) -> list:
    """Each model's ModelSpec: Llama.build's arguments (the entry's options over the command's flags), its context,
    and (for a memory budget) the bytes it will hold. Its folder and unmerged adapters are checked here, before
    anything loads (an adapter against the base's shapes, as merging checks it)."""
    from llama.distributed import env_world_size, resolve_device, resolve_dtype
    from llama.loading import checkpoint_context, estimate_bytes, open_checkpoint, resolve_max_seq_len
    from llama.lora import open_adapter
    from llama.pool import ModelSpec

    mp = defaults["model_parallel_size"] or env_world_size()
    specs = []
    for e in entries:
        build = {**defaults, **{k: v for k, v in e.items() if k not in ("name", "adapters", "demo")}}
        # Known before the model loads: /v1/models says it while the model loads, or before it ever does.
        build["max_seq_len"] = resolve_max_seq_len(build["max_seq_len"], checkpoint_context(build["ckpt_dir"]))
        ckpt = open_checkpoint(build["ckpt_dir"], mp) if e["adapters"] or estimate else None
        for adapter, folder in e["adapters"].items():
            open_adapter(folder, ckpt)
        size = 0
        if estimate:
            dtype = resolve_dtype(build["dtype"], resolve_device(build["device"]))
            size = estimate_bytes(build["ckpt_dir"], build["max_seq_len"], build["max_batch_size"], mp, dtype,
                                  build["quantize"], build["group_size"], build["kv_cache_tokens"])
        specs.append(ModelSpec(e["name"], build, dict(e["adapters"]), build["max_seq_len"], size,
                               DEMO_DESCRIPTION if e.get("demo") else ""))
    return specs


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


def follow(pool) -> None:
    """Ranks > 0: run rank 0's loads and steps until it shuts down. Signals are rank 0's to act on: a Ctrl-C in
    the terminal reaches every rank, and this one must keep following until rank 0 has ended the requests in
    flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        pool.follow()
    except Exception as e:  # noqa: BLE001 - rank 0 is gone, or a step failed
        log.error("rank %s: the engine stopped: %s: %s", os.environ.get("RANK", "0"), type(e).__name__, e)
        raise SystemExit(1) from None


def run(argv: Optional[Sequence[str]] = None, prog: str = "llama-serve") -> int:
    return cli.run(main, argv, prog)


if __name__ == "__main__":
    sys.exit(run())
