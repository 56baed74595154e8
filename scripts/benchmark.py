"""Load and decode speed of `Llama`, optionally against transformers' LlamaForCausalLM on the same weights.

    python scripts/benchmark.py --shape stories260k --batch 1 --gen_len 256 --compare hf
    python scripts/benchmark.py --shape tinyllama-1.1b --dtype bf16 --batch 1,8 --gen_len 16 --compare hf
    python scripts/benchmark.py --shape tinyllama-1.1b --dtype bf16 --quantize int4 --batch 1,8 --compare hf
    python scripts/benchmark.py --ckpt_dir /tmp/stories260K --compile
    python scripts/benchmark.py --shape tinyllama-1.1b --dtype bf16 --batch 1,8 --device cuda --compile --compare hf
    python scripts/benchmark.py --ckpt_dir /tmp/stories260K --concurrency 16 --gen_len 120 --compare hf
    python scripts/benchmark.py --ckpt_dir /tmp/stories260K --prefill_gap 400
    python scripts/benchmark.py --shape tinyllama-1.1b --dtype bf16 --quantize none,int8,int4 --gen_len 128 \
        --threads 1 --compare llamacpp --llamacpp ../anchors/llama.cpp-build/bin
    python scripts/benchmark.py --smoke            # tiny shape, a few tokens: seconds (CI runs it)

A --shape gets random weights, written once to CACHE_DIR/<shape>-<dtype> (default
~/.cache/llama-bench) in Meta's layout, so loading is measured from disk like a real checkpoint.
Loading runs in a fresh process; its peak RSS growth over the weight bytes shows what the load
copies (memory-mapped weights it does not copy are paged in by the first forward instead).
Each round runs one greedy generate per batch size: the time until the first logits is the
prefill (time to first token), the rest is decode. With --compare hf the same rounds run
transformers' generate on the same weights, alternating with ours, and the ratios ours/HF are
given as median [min-max] over rounds. On a GPU the clock waits for the device
(torch.cuda.synchronize) at the end of the prefill and of the round, and the load also reports
peak GPU memory over the weight bytes. Progress goes to stderr, the table (or with --json, a
JSON object) to stdout.

--concurrency N sends N greedy requests together, prompts of mixed lengths (4 to 2 * prompt_len
tokens), each `generate` from its own thread, and compares the total tokens per second with the
same requests sent one after another, and with --compare hf, transformers' own continuous batching
(`LlamaForCausalLM.generate_batch`) on the same weights: as `generate_batch(inputs,
generation_config)` runs by default, and with its paged cache sized for the requests. --max_seq_len S
gives the engine a longer cache than the requests need (as a server has). --prefill_gap L streams 8 greedy requests
and, once they decode, sends a prompt of L tokens: it reports the streams' gaps between tokens
(median, p99) before and while that prompt is prefilled, a chunk per step.

--compare llamacpp (batch 1) converts the same weights to GGUF (our Hugging Face export, then
llama.cpp's convert_hf_to_gguf.py; llama-quantize --pure for Q8_0 and Q4_0, which int8 and int4
face), compares greedy text from one prompt (llama-simple), and alternates llama-bench with our
rounds, mode by mode: prefill and decode tok/s, ratios round by round, and for the decode the
bytes each side streams per token times its tok/s over a read bandwidth measured each round
(scripts/llamacpp.py, docs/performance.md).
"""
from __future__ import annotations

import json as jsonlib
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Dict, List, Optional, Tuple

import torch

from llama import Llama, cli
from llama.checkpoint import write_checkpoint
from llama.hf import meta_to_hf
from llama.loading import open_checkpoint
from llama.hf import params_to_config
from llama.distributed import resolve_device, resolve_dtype
from llama.model import ModelArgs
from llama.quantize import weight_bytes
from llama.tiny import TINY_PARAMS, random_state_dict, train_tokenizer

SHAPES = {
    "tiny": {**TINY_PARAMS, "vocab_size": 512},
    "stories260k": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, norm_eps=1e-5),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256,
                           norm_eps=1e-5),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5),
}
DEFAULT_CACHE = Path.home() / ".cache" / "llama-bench"


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic_checkpoint(shape: str, dtype: torch.dtype, cache_dir: Path, tokenizer_path: Optional[str] = None) -> Path:
    """Random weights of a named shape in `dtype`, written once (atomically) and reused; with
    `tokenizer_path`, that tokenizer (in a folder of its own), else a small one trained here."""
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r} is not one of {sorted(SHAPES)}")
    out = cache_dir / f"{shape}-{str(dtype).removeprefix('torch.')}"
    if tokenizer_path is not None:
        return _with_tokenizer(synthetic_checkpoint(shape, dtype, cache_dir), Path(tokenizer_path))
    if out.is_dir():
        return out
    progress(f"writing random {shape} weights to {out} (once)")
    params = SHAPES[shape]
    state = random_state_dict(ModelArgs.from_params(params), seed=0, std=0.02)
    for name in state:  # one tensor at a time, to keep the peak low
        state[name] = state[name].to(dtype)
    tokenizer = cache_dir / f".{shape}.tokenizer.model"
    cache_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(tokenizer)  # prompts are random ids: any tokenizer with few enough pieces will do
    try:
        return write_checkpoint(out, params, state, tokenizer_path=tokenizer)
    finally:
        tokenizer.unlink(missing_ok=True)


def _with_tokenizer(ckpt: Path, tokenizer: Path) -> Path:
    """A folder beside `ckpt` whose files link to its weights and whose tokenizer.model is `tokenizer`."""
    if not tokenizer.is_file():
        raise FileNotFoundError(f"--tokenizer_path {tokenizer} does not exist")
    import hashlib

    digest = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:12]
    out = ckpt.with_name(f"{ckpt.name}-tok{digest}")
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in ckpt.iterdir():
            if f.name != "tokenizer.model":
                os.symlink(f.resolve(), tmp / f.name)
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        os.replace(tmp, out)
    return out


def _memory(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in bytes. Not ru_maxrss: Linux carries that
    over from the parent through fork and exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_probe(ckpt_dir: str, build_kwargs: dict, queue) -> None:
    before = _memory("VmRSS")
    start = time.perf_counter()
    generator = Llama.build(ckpt_dir, os.path.join(ckpt_dir, "tokenizer.model"), **build_kwargs)
    sync(generator.device)
    seconds = time.perf_counter() - start
    load_peak = _memory("VmHWM")
    generator.generate([[1]], max_gen_len=1, temperature=0)  # pages in every weight the load left mapped
    peak = _memory("VmHWM")
    result = dict(load_s=seconds, weight_bytes=weight_bytes(generator.model), load_peak_rss_growth=load_peak - before,
                  first_token_peak_rss_growth=peak - before)
    if generator.device.type == "cuda":  # the weights live there; host RSS only shows what staging costs
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(generator.device)
    queue.put(result)


def measure_load(ckpt_dir: str, build_kwargs: dict) -> dict:
    """Llama.build in a fresh process: seconds, weight bytes, and peak RSS growth over the weight bytes."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_probe, args=(ckpt_dir, {**build_kwargs, "compile": False}, queue))
    proc.start()
    while True:  # a probe that dies (a bad flag, out of memory) puts nothing: stop instead of waiting forever
        try:
            result = queue.get(timeout=1)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the load probe failed (exit status {proc.exitcode}); its error is above")
    proc.join()
    for key in ("load", "first_token"):
        result[f"{key}_peak_rss_over_weights"] = result[f"{key}_peak_rss_growth"] / result["weight_bytes"]
    if "gpu_peak_bytes" in result:
        result["gpu_peak_over_weights"] = result["gpu_peak_bytes"] / result["weight_bytes"]
    return result


def hf_model(ckpt_dir: str, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM holding the checkpoint's weights (converted by meta_to_hf)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ckpt = open_checkpoint(ckpt_dir)
    p = ckpt.args
    config = transformers.LlamaConfig(**params_to_config(p, dtype), pad_token_id=0)
    full = dict(ckpt.rank_tensors(0, 1))
    hf_state = {k: v.to(dtype) for k, v in meta_to_hf(full, p).items()}
    with torch.device("meta"):  # no random init of weights that are replaced right away
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(hf_state, assign=True, strict=False)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were made on the meta device
    return model.to(device).eval().requires_grad_(False)


class Ours:
    def __init__(self, generator: Llama, name: str = "ours"):
        self.generator, self.name = generator, name

    def generate(self, prompts: torch.Tensor, n: int, marks: List[float]) -> List[List[int]]:
        """Greedy, every prompt submitted at once; the mark is when the last row got its first token (the
        engine sets it once the token is on the host)."""
        submitted = [self.generator.submit(p, n, temperature=0) for p in prompts.tolist()]
        for c in submitted:
            c.wait()
        marks.append(max(c.request.first_token_at for c in submitted))
        return [c.tokens for c in submitted]


class HF:
    name = "hf"

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def generate(self, prompts: torch.Tensor, n: int, marks: List[float]) -> List[List[int]]:
        def marked(input_ids, scores):  # a logits processor: first called right after the prefill
            if not marks:
                sync(scores.device)
                marks.append(time.perf_counter())
            return scores

        prompts = prompts.to(self.model.device)
        out = self.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                  do_sample=False, eos_token_id=2, pad_token_id=0, logits_processor=[marked])
        rows = out[:, prompts.shape[1]:].tolist()
        return [row[: row.index(2)] if 2 in row else row for row in rows]


def time_round(runner, prompts: torch.Tensor, gen_len: int, device: torch.device) -> dict:
    """One timed generate: the prefill up to the first logits, then the decode of the other tokens."""
    B, T = prompts.shape
    marks: List[float] = []
    sync(device)
    start = time.perf_counter()
    tokens = runner.generate(prompts, gen_len, marks)
    sync(device)
    end = time.perf_counter()
    ttft, decode_s = marks[0] - start, end - marks[0]
    decoded = sum(max(len(row) - 1, 0) for row in tokens)  # the first token of each row comes from the prefill
    return dict(ttft_s=ttft, prefill_tok_s=B * T / ttft, decode_tok_s_total=decoded / decode_s,
                decode_tok_s_per_seq=decoded / decode_s / B, tokens=tokens)


def mixed_prompts(n: int, prompt_len: int, vocab: int, seed: int = 0) -> List[List[int]]:
    """n prompts of 4 to 2 * prompt_len random tokens after BOS."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 2 * prompt_len + 1))] for _ in range(n)]


def _threads(generator: Llama, prompts: List[List[int]], gen_len: int) -> List[List[int]]:
    out: List[Optional[List[int]]] = [None] * len(prompts)

    def one(i: int) -> None:
        out[i] = generator.generate([prompts[i]], max_gen_len=gen_len, temperature=0)[0][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _hf_batch(model, prompts: List[List[int]], gen_len: int, eos: int,
              sized_for: Optional[int] = 256) -> List[List[int]]:
    """transformers' continuous batching of `prompts`: with `sized_for` (a per-step token budget, as our
    prefill_chunk), its paged cache sized for these requests; with None, as `generate_batch(inputs,
    generation_config)` sizes it, from the free memory, which takes seconds to allocate on a CPU."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=gen_len, do_sample=False, eos_token_id=eos, pad_token_id=0)
    batching = None
    if sized_for is not None:
        page = 32
        blocks = sum(-(-(len(p) + gen_len) // page) for p in prompts) + len(prompts)
        batching = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=sized_for)
    out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching,
                               progress_bar=False)
    rows = [list(out[f"req_{i}"].generated_tokens) for i in range(len(prompts))]
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def run_concurrency(generator: Llama, hf, n: int, prompt_len: int, gen_len: int, rounds: int,
                    device: torch.device) -> dict:
    """Total tok/s of n requests sent together (threads), one at a time, and through generate_batch."""
    prompts = mixed_prompts(n, prompt_len, generator.model.vocab_size)
    eos = generator.tokenizer.eos_id
    runners = {"threads": lambda: _threads(generator, prompts, gen_len),
               "serial": lambda: [generator.generate([p], max_gen_len=gen_len, temperature=0)[0][0] for p in prompts]}
    if hf is not None:
        runners["hf_generate_batch"] = lambda: _hf_batch(hf, prompts, gen_len, eos, sized_for=None)
        runners["hf_generate_batch_sized"] = lambda: _hf_batch(hf, prompts, gen_len, eos,
                                                               sized_for=generator.engine.prefill_chunk)
    for name, runner in runners.items():
        progress(f"concurrency {n}: warm-up {name}")
        runner()
    samples: Dict[str, List[float]] = {name: [] for name in runners}
    tokens: Dict[str, List[List[int]]] = {}
    for i in range(rounds):
        for name, runner in runners.items():
            progress(f"concurrency {n}: round {i + 1}/{rounds} {name}")
            sync(device)
            start = time.perf_counter()
            tokens[name] = runner()
            sync(device)
            samples[name].append(sum(len(t) for t in tokens[name]) / (time.perf_counter() - start))
    report = {"requests": n, "tok_s_total": {k: statistics.median(v) for k, v in samples.items()},
              "ratio": {f"threads/{k}": _median_range([a / b for a, b in zip(samples["threads"], v)])
                        for k, v in samples.items() if k != "threads"}}
    report["same_tokens"] = {k: tokens[k] == tokens["threads"] for k in tokens if k != "threads"}
    return report


def run_prefill_gap(generator: Llama, prompt_tokens: int, gen_len: int, streams: int = 8) -> dict:
    """Inter-token gaps of `streams` greedy streams before, and while, a prompt_tokens-long prompt is prefilled."""
    vocab = generator.model.vocab_size
    prompts = [generator.tokenizer.decode(p[1:]) for p in mixed_prompts(streams, 8, vocab, seed=1)]
    arrivals: List[List[float]] = [[] for _ in prompts]
    marks: Dict[str, float] = {}

    def consume(i: int) -> None:
        for pieces in generator.stream([prompts[i]], temperature=0, max_gen_len=gen_len):
            arrivals[i].append(time.perf_counter())

    def long_prompt() -> None:
        while min(len(a) for a in arrivals) < gen_len // 3:
            time.sleep(0.001)
        marks["sent"] = time.perf_counter()
        generator.generate([mixed_prompts(1, prompt_tokens, vocab, seed=2)[0][:prompt_tokens]], max_gen_len=1,
                           temperature=0)
        marks["done"] = time.perf_counter()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(streams)]
    threads.append(threading.Thread(target=long_prompt))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gaps = [(b, b - a) for times in arrivals for a, b in zip(times, times[1:])]
    during = [g for t, g in gaps if marks["sent"] <= t <= marks["done"] + 1e-3]
    everything = sorted(g for _, g in gaps)

    def p(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"streams": streams, "prompt_tokens": prompt_tokens, "prefill_chunk": generator.engine.prefill_chunk,
            "gap_ms": {"p50": p(everything, 0.5) * 1e3, "p99": p(everything, 0.99) * 1e3,
                       "max_while_prefilling": max(during, default=float("nan")) * 1e3},
            "p99_over_p50": p(everything, 0.99) / p(everything, 0.5),
            "prefill_s": marks["done"] - marks["sent"]}


def _median_range(values: List[float]) -> Dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def quantize_modes(quantize) -> List[Optional[str]]:
    """--quantize as a list of modes: one ("int4"), or several ("none,int8,int4") to time in one run."""
    if quantize is None:
        return [None]
    modes = quantize.split(",") if isinstance(quantize, str) else list(quantize)
    return [None if m in (None, "none") else str(m) for m in modes]


def _ratios(samples: Dict[str, list], a: str, b: str) -> Dict[str, Dict[str, float]]:
    """a/b per round, as median [min-max], for the prefill and decode speeds."""
    return {k: _median_range([x[k] / y[k] for x, y in zip(samples[a], samples[b])])
            for k in ("prefill_tok_s", "decode_tok_s_total")}


def setup(ckpt_dir: Optional[str], shape: Optional[str], dtype: str, device: str, threads: Optional[int],
          cache_dir: Optional[str], tokenizer_path: Optional[str] = None) -> Tuple[str, torch.device, torch.dtype]:
    """The checkpoint to measure (a --shape's random weights written on first use), device and dtype."""
    if (ckpt_dir is None) == (shape is None):
        raise ValueError("pass exactly one of --ckpt_dir and --shape")
    if threads is not None:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if shape is not None:
        ckpt_dir = str(synthetic_checkpoint(shape, torch_dtype, Path(cache_dir) if cache_dir else DEFAULT_CACHE,
                                            tokenizer_path))
    return ckpt_dir, torch_device, torch_dtype


def run(ckpt_dir: Optional[str] = None, shape: Optional[str] = None, dtype: str = "float32", batch=1,
        prompt_len: int = 16, gen_len: int = 64, rounds: int = 3, compile: bool = False,
        quantize: Optional[str] = None, compare: Optional[str] = None, cache_dir: Optional[str] = None,
        threads: Optional[int] = None, seed: int = 0, device: str = "cpu", group_size: Optional[int] = None,
        llamacpp: Optional[str] = None, llamacpp_src: Optional[str] = None, tokenizer_path: Optional[str] = None) -> dict:
    modes = quantize_modes(quantize)
    if compare not in (None, "hf", "llamacpp"):
        raise ValueError(f"--compare {compare!r}: use 'hf' (transformers) or 'llamacpp'")
    batches = [int(b) for b in (batch if isinstance(batch, (list, tuple)) else [batch])]
    if compare == "llamacpp" and batches != [1]:
        raise ValueError("--compare llamacpp measures batch 1 (llama-bench decodes one sequence): pass --batch 1")
    anchor = _llamacpp(llamacpp, llamacpp_src) if compare == "llamacpp" else None  # a missing build fails first
    ckpt_dir, torch_device, torch_dtype = setup(ckpt_dir, shape, dtype, device, threads, cache_dir, tokenizer_path)
    build_kwargs = dict(max_seq_len=prompt_len + gen_len, max_batch_size=max(batches), device=device,
                        dtype=torch_dtype)

    def mode_kwargs(mode: Optional[str]) -> dict:
        return dict(quantize=mode, group_size=group_size if mode == "int4" else None)

    loads = {}
    for mode in modes:
        progress(f"measuring the load of {ckpt_dir} (quantize={mode}) in a fresh process")
        loads[mode] = measure_load(ckpt_dir, {**build_kwargs, **mode_kwargs(mode)})
    runners = [Ours(Llama.build(ckpt_dir, os.path.join(ckpt_dir, "tokenizer.model"), compile=compile,
                                **build_kwargs, **mode_kwargs(mode)),
                    "ours" if len(modes) == 1 else f"ours:{mode or 'none'}") for mode in modes]
    for runner in runners:
        compiles = runner.generator.compile_all()  # every bucket now, outside the timed rounds
        if compiles:
            progress(f"{runner.name}: compiled the decode step for {compiles} buckets")
    ours = runners[0]
    if compare == "llamacpp":
        report = run_llamacpp(ckpt_dir, runners, modes, torch_dtype, prompt_len, gen_len, rounds,
                              Path(cache_dir) if cache_dir else DEFAULT_CACHE, anchor, seed)
        report["load"], report["loads"] = loads[modes[0]], {m or "none": v for m, v in loads.items()}
        report["config"].update(shape=shape, compile=compile, group_size=group_size)
        return report
    if compare == "hf":
        progress("building transformers' LlamaForCausalLM on the same weights")
        runners.append(HF(hf_model(ckpt_dir, torch_dtype, torch_device)))

    vocab = ours.generator.model.vocab_size
    gen = torch.Generator().manual_seed(seed)
    results = []
    for B in batches:
        prompts = torch.randint(3, vocab, (B, prompt_len), generator=gen)
        for runner in runners:  # warm-up (and compilation) outside the timed rounds
            progress(f"batch {B}: warm-up {runner.name}")
            runner.generate(prompts, min(gen_len, 4), [])
        samples: Dict[str, list] = {r.name: [] for r in runners}
        for i in range(rounds):
            for runner in runners:  # alternate, so drifting machine load hits both alike
                progress(f"batch {B}: round {i + 1}/{rounds} {runner.name}")
                samples[runner.name].append(time_round(runner, prompts, gen_len, torch_device))
        row = dict(batch=B)
        for name, rs in samples.items():
            row[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "tokens"}
        names = [r.name for r in runners]
        if len(modes) == 1 and compare == "hf":
            row["same_tokens"] = all(o["tokens"] == h["tokens"] for o, h in zip(samples["ours"], samples["hf"]))
            row["ratio"] = _ratios(samples, "ours", "hf")
        elif len(modes) > 1:  # every pair, each ratio taken round by round
            row["ratios"] = {f"{a}/{b}": _ratios(samples, a, b) for i, a in enumerate(names) for b in names[i + 1:]}
        results.append(row)
    quantized = ",".join(m or "none" for m in modes) + (f" (int4 group size {group_size})" if group_size else "")
    config = dict(ckpt_dir=ckpt_dir, shape=shape, dtype=str(torch_dtype).removeprefix("torch."), compile=compile,
                  quantize=quantized if quantize is not None else None, prompt_len=prompt_len, gen_len=gen_len,
                  rounds=rounds, threads=torch.get_num_threads(), torch=torch.__version__, device=str(torch_device),
                  device_name=torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu")
    report = dict(config=config, load=loads[modes[0]], results=results)
    if len(modes) > 1:
        report["loads"] = {m or "none": v for m, v in loads.items()}
    return report


def read_bandwidth(n_bytes: int = 1 << 29, reps: int = 3) -> float:
    """A STREAM-style read rate in GB/s at torch's thread count: the best of a float32 sum and a
    matrix-vector product over a buffer far larger than the caches."""
    buf = torch.ones(n_bytes // 4)
    ones = torch.ones(1 << 12)
    best = 0.0
    for read in (lambda: buf.sum(), lambda: torch.mv(buf.view(-1, 1 << 12), ones)):
        read()
        for _ in range(reps):
            start = time.perf_counter()
            read()
            best = max(best, n_bytes / (time.perf_counter() - start) / 1e9)
    return best


def streamed_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: the weights, of the token embedding one row."""
    emb = model.tok_embeddings.weight
    return weight_bytes(model) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def _llamacpp(bin_dir: Optional[str], src_dir: Optional[str]):
    """scripts/llamacpp.py's LlamaCpp for a build (the scripts folder is no package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamacpp import LlamaCpp

    return LlamaCpp(bin_dir, src_dir)


def run_llamacpp(ckpt_dir: str, runners: List["Ours"], modes: List[Optional[str]], dtype: torch.dtype,
                 prompt_len: int, gen_len: int, rounds: int, cache_dir: Path, lc, seed: int) -> dict:
    """Our modes against llama.cpp build `lc` on the same weights, batch 1, alternating round by round
    (see the module docstring)."""
    from llamacpp import GGUF_TYPES, common_prefix, hf_export

    float_name = {torch.float32: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    name = Path(ckpt_dir).name
    progress(f"llama.cpp: {lc.bin}; our Hugging Face export of {ckpt_dir} and its GGUF files in {cache_dir}")
    hf_dir = hf_export(ckpt_dir, cache_dir / f"{name}-hf")
    types = {mode: GGUF_TYPES[mode or float_name] for mode in modes}
    ggufs = {mode: lc.gguf(hf_dir, cache_dir / f"{name}-gguf", t, GGUF_TYPES[float_name]) for mode, t in types.items()}
    threads = torch.get_num_threads()

    text = {}
    prompt = "Once upon a time"
    for runner, mode in zip(runners, modes):
        progress(f"greedy text, {runner.name} and llama.cpp {types[mode]}")
        if runner.generator.tokenizer.n_words < runner.generator.model.vocab_size:
            raise ValueError(f"the tokenizer has {runner.generator.tokenizer.n_words} pieces for a vocabulary of "
                             f"{runner.generator.model.vocab_size}: greedy text from random weights needs one that covers "
                             "it: pass --tokenizer_path (e.g. ../shared/assets/llama_tokenizer.model)")
        ours_text = runner.generator.text_completion([prompt], temperature=0, max_gen_len=32)[0]["generation"]
        theirs = lc.greedy_text(ggufs[mode], prompt, 32, threads)
        same = common_prefix(ours_text.strip(), theirs.strip())
        text[runner.name] = dict(same=ours_text.strip() == theirs.strip(), common_chars=same,
                                 ours_chars=len(ours_text.strip()), llamacpp_chars=len(theirs.strip()),
                                 ours=ours_text, llamacpp=theirs)

    prompts = torch.randint(3, runners[0].generator.model.vocab_size, (1, prompt_len),
                            generator=torch.Generator().manual_seed(seed))
    for runner in runners:
        runner.generate(prompts, 4, [])  # warm-up
    samples = {r.name: {"ours": [], "llamacpp": []} for r in runners}
    bandwidth = []
    for i in range(rounds):
        progress(f"round {i + 1}/{rounds}: read bandwidth")
        bandwidth.append(read_bandwidth())
        for runner, mode in zip(runners, modes):
            progress(f"round {i + 1}/{rounds}: {runner.name}, then llama.cpp {types[mode]}")
            r = time_round(runner, prompts, gen_len, torch.device("cpu"))
            samples[runner.name]["ours"].append(dict(prefill_tok_s=r["prefill_tok_s"], decode_tok_s=r["decode_tok_s_total"]))
            samples[runner.name]["llamacpp"].append(lc.bench(ggufs[mode], threads, prompt_len, gen_len))
    bw = statistics.median(bandwidth)
    rows = []
    for runner, mode in zip(runners, modes):
        ours, theirs = samples[runner.name]["ours"], samples[runner.name]["llamacpp"]
        ours_bytes = streamed_bytes(runner.generator.model)
        their_bytes, their_types = lc.streamed_bytes(ggufs[mode])
        row = dict(impl=runner.name, gguf=types[mode], gguf_tensor_bytes=their_types, text=text[runner.name],
                   ours_bytes_per_token=ours_bytes, llamacpp_bytes_per_token=their_bytes)
        for key in ("prefill_tok_s", "decode_tok_s"):
            row[key] = dict(ours=statistics.median(o[key] for o in ours),
                            llamacpp=statistics.median(t[key] for t in theirs),
                            ratio=_median_range([o[key] / t[key] for o, t in zip(ours, theirs)]))
        decode = row["decode_tok_s"]
        row["decode_gb_s"] = dict(ours=ours_bytes * decode["ours"] / 1e9, llamacpp=their_bytes * decode["llamacpp"] / 1e9)
        row["decode_fraction_of_bandwidth"] = {k: v / bw for k, v in row["decode_gb_s"].items()}
        rows.append(row)
    config = dict(ckpt_dir=ckpt_dir, dtype=float_name, prompt_len=prompt_len, gen_len=gen_len, rounds=rounds,
                  threads=threads, torch=torch.__version__, device="cpu", device_name="cpu",
                  quantize=",".join(m or "none" for m in modes), llamacpp=str(lc.bin))
    return dict(config=config, read_bandwidth_gb_s=dict(median=bw, rounds=bandwidth), llamacpp=rows)


def llamacpp_table(report: dict) -> str:
    c = report["config"]
    bw = report["read_bandwidth_gb_s"]
    lines = [f"{c['shape'] or c['ckpt_dir']}  {c['dtype']}  batch 1  prompt {c['prompt_len']}  gen {c['gen_len']}  "
             f"{c['rounds']} rounds  {c['threads']} threads  torch {c['torch']}  llama.cpp {c['llamacpp']}",
             f"read bandwidth {bw['median']:.1f} GB/s (median of the rounds: "
             f"{', '.join(f'{b:.1f}' for b in bw['rounds'])})",
             *(_load_line(f" ({name})", load) for name, load in report["loads"].items()),
             "",
             "| ours | llama.cpp | decode tok/s ours | llama.cpp | ours/llama.cpp | GB/s ours (% of read bw) | "
             "llama.cpp | prefill tok/s ours | llama.cpp | ours/llama.cpp | greedy text |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["llamacpp"]:
        d, p, g, f = r["decode_tok_s"], r["prefill_tok_s"], r["decode_gb_s"], r["decode_fraction_of_bandwidth"]
        t = r["text"]
        same = "same" if t["same"] else f"first {t['common_chars']} of {t['ours_chars']} chars same"

        def ratio(x):
            return f"{x['median']:.2f}x [{x['min']:.2f}-{x['max']:.2f}]"
        lines.append(f"| {r['impl']} | {r['gguf']} | {d['ours']:.2f} | {d['llamacpp']:.2f} | {ratio(d['ratio'])} | "
                     f"{g['ours']:.1f} ({f['ours']:.0%}) | {g['llamacpp']:.1f} ({f['llamacpp']:.0%}) | "
                     f"{p['ours']:.1f} | {p['llamacpp']:.1f} | {ratio(p['ratio'])} | {same} |")
    return "\n".join(lines)


def run_engine(ckpt_dir, shape, dtype, prompt_len, gen_len, rounds, compile, quantize, compare, cache_dir, threads,
               device, concurrency, prefill_gap, prefill_chunk, group_size=None, max_seq_len=None) -> dict:
    """The --concurrency and --prefill_gap reports (see the module docstring)."""
    ckpt_dir, torch_device, torch_dtype = setup(ckpt_dir, shape, dtype, device, threads, cache_dir)
    n = concurrency or 8
    max_seq_len = max(max(2 * prompt_len + 1, prefill_gap or 0) + gen_len + 1, max_seq_len or 0)
    generator = Llama.build(ckpt_dir, os.path.join(ckpt_dir, "tokenizer.model"), max_seq_len=max_seq_len,
                            max_batch_size=max(n, 9), device=device, dtype=torch_dtype, compile=compile,
                            quantize=quantize, prefill_chunk=prefill_chunk, group_size=group_size)
    generator.compile_all()  # every bucket now, outside the timed rounds
    report = {"config": dict(ckpt_dir=ckpt_dir, dtype=str(torch_dtype).removeprefix("torch."), compile=compile,
                             quantize=quantize, prompt_len=prompt_len, gen_len=gen_len, rounds=rounds,
                             threads=torch.get_num_threads(), torch=torch.__version__, device=str(torch_device))}
    if concurrency is not None:
        hf = hf_model(ckpt_dir, torch_dtype, torch_device) if compare == "hf" else None
        report["concurrency"] = run_concurrency(generator, hf, concurrency, prompt_len, gen_len, rounds, torch_device)
    if prefill_gap is not None:
        progress(f"8 streams and a {prefill_gap}-token prompt")
        generator.generate([[1, 5]], max_gen_len=2, temperature=0)  # warm-up
        report["prefill_gap"] = run_prefill_gap(generator, prefill_gap, gen_len)
    return report


def _load_line(name: str, load: dict) -> str:
    return (f"load{name} {load['load_s']:.2f} s   weights {load['weight_bytes'] / 1e6:.1f} MB   "
            f"peak RSS growth / weight bytes: {load['load_peak_rss_over_weights']:.2f} after the load, "
            f"{load['first_token_peak_rss_over_weights']:.2f} after the first token"
            + (f"   peak GPU memory / weight bytes: {load['gpu_peak_over_weights']:.2f}"
               if "gpu_peak_over_weights" in load else ""))


def table(report: dict) -> str:
    c = report["config"]
    loads = report.get("loads") or {"": report["load"]}
    lines = [
        f"{c['shape'] or c['ckpt_dir']}  {c['device_name']}  {c['dtype']}  compile={c['compile']}  quantize={c['quantize']}  "
        f"prompt {c['prompt_len']}  gen {c['gen_len']}  {c['rounds']} rounds  {c['threads']} threads  torch {c['torch']}",
        *(_load_line(f" ({name})" if name else "", load) for name, load in loads.items()),
        "",
        "| batch | impl | prefill tok/s | TTFT ms | decode tok/s per seq | decode tok/s total |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        for name, r in row.items():
            if isinstance(r, dict) and "ttft_s" in r:
                lines.append(f"| {row['batch']} | {name} | {r['prefill_tok_s']:.0f} | {r['ttft_s'] * 1e3:.1f} | "
                             f"{r['decode_tok_s_per_seq']:.1f} | {r['decode_tok_s_total']:.1f} |")
        ratios = {"ours/hf": row["ratio"]} if "ratio" in row else row.get("ratios", {})
        for pair, ratio in ratios.items():
            cells = [f"{v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]" for v in ratio.values()]
            lines.append(f"| {row['batch']} | {pair} | {cells[0]} | | | {cells[1]} |")
    ratios = [row for row in report["results"] if "same_tokens" in row]
    if ratios:
        lines.append("")
        lines.append("same greedy tokens as transformers (expected in float32 only): " + ", ".join(
            f"batch {r['batch']}: {'yes' if r['same_tokens'] else 'no'}" for r in ratios))
    return "\n".join(lines)


def main(ckpt_dir: Optional[str] = None, shape: Optional[str] = None, dtype: str = "float32", batch=1,
         prompt_len: int = 16, gen_len: int = 64, rounds: int = 3, compile: bool = False,
         quantize: Optional[str] = None, compare: Optional[str] = None, cache_dir: Optional[str] = None,
         threads: Optional[int] = None, device: str = "cpu", json: bool = False, smoke: bool = False,
         concurrency: Optional[int] = None, prefill_gap: Optional[int] = None, prefill_chunk: int = 128,
         group_size: Optional[int] = None, max_seq_len: Optional[int] = None, llamacpp: Optional[str] = None,
         llamacpp_src: Optional[str] = None, tokenizer_path: Optional[str] = None) -> None:
    if smoke:  # CI: the tiny shape, a few tokens, against transformers
        shape, ckpt_dir, batch, prompt_len, gen_len, rounds, compare = "tiny", None, (1, 2), 4, 4, 1, "hf"
    if concurrency is not None or prefill_gap is not None:
        report = run_engine(ckpt_dir, shape, dtype, prompt_len, gen_len, rounds, compile, quantize, compare,
                            cache_dir, threads, device, concurrency, prefill_gap, prefill_chunk, group_size,
                            max_seq_len)
        print(jsonlib.dumps(report, indent=2))
        return
    report = run(ckpt_dir, shape, dtype, batch, prompt_len, gen_len, rounds, compile, quantize, compare,
                 cache_dir, threads, device=device, group_size=group_size, llamacpp=llamacpp, llamacpp_src=llamacpp_src,
                 tokenizer_path=tokenizer_path)
    if "llamacpp" in report:
        print(jsonlib.dumps(report, indent=2) if json else llamacpp_table(report))
        return
    if json:
        for row in report["results"]:
            row.pop("tokens", None)
        print(jsonlib.dumps(report, indent=2))
    else:
        print(table(report))


if __name__ == "__main__":
    sys.exit(cli.run(main, more_errors=(RuntimeError,)))
