"""Complete text prompts with a LLaMA checkpoint, on CPU, one GPU or N GPUs.

    python example.py                                   # tiny random-weight demo, no download
    torchrun --nproc_per_node N example.py --ckpt_dir D [--tokenizer_path T] --seed 1 \
        --prompts "first prompt" "second prompt" --temperature 0.6 --top_p 0.9 [--top_k 40] \
        --max_seq_len 128 --max_gen_len 64 --max_batch_size 4 [--device cpu] [--dtype bf16] \
        [--stop "." | --stop '["\n", "THE END"]'] [--stream] [--compile] [--quantize {int8,int4} [--group_size G]] \
        [--lora ADAPTER]

Only rank 0 prints. A bad flag or file ends every rank with a one-line error and exit status 1;
Ctrl-C ends every rank quietly with exit status 130.
"""
from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import tempfile
import typing
from typing import Callable, List, Optional, Set, Union

import fire
import torch

from llama import Llama
from llama.distributed import RankError, env_rank

DEFAULT_PROMPTS = ["Once upon a time", "The capital of France is"]
DEMO_WARNING = (
    "No --ckpt_dir given: running a tiny random-weight demo model built on the spot. Its output is "
    "gibberish BY DESIGN. For real text pass --ckpt_dir with a Meta checkpoint folder (params.json, "
    "consolidated.NN.pth, tokenizer.model), e.g. one made by scripts/convert_llama2c.py."
)
log = logging.getLogger("example")


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    prompts: Optional[List[str]] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    stop: Union[str, List[str], None] = None,
    stream: bool = False,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    seed: int = 1,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    lora: Optional[str] = None,
    group_size: Optional[int] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
) -> None:
    prompts = [str(p) for p in (prompts if prompts is not None else DEFAULT_PROMPTS)]
    with tempfile.TemporaryDirectory(prefix="llama-demo-") as scratch:
        if ckpt_dir is None:
            from llama.tiny import make_tiny_checkpoint

            log.warning(DEMO_WARNING)
            ckpt_dir = str(make_tiny_checkpoint(os.path.join(scratch, "tiny")))
        ckpt_dir = str(ckpt_dir)
        tokenizer_path = str(tokenizer_path) if tokenizer_path else None  # build finds the folder's
        generator = Llama.build(
            ckpt_dir=ckpt_dir,
            tokenizer_path=tokenizer_path,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            model_parallel_size=model_parallel_size,
            seed=seed,
            device=device,
            dtype=dtype,
            compile=compile,
            quantize=quantize,
            lora=None if lora is None else str(lora),
            group_size=group_size,
            kv_cache_tokens=kv_cache_tokens,
            prefix_cache=prefix_cache,
        )
    sampling = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, top_k=top_k, stop=stop)
    if stream:  # one prompt at a time, so each prints as it is written
        for prompt in prompts:
            say(prompt, end="", flush=True)
            for pieces in generator.stream([prompt], **sampling):
                say(pieces[0], end="", flush=True)
            say("\n\n==================================\n", flush=True)
        return
    for prompt, result in zip(prompts, generator.text_completion(prompts, **sampling)):
        say(prompt + result["generation"])
        say("\n==================================\n", flush=True)


def say(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if env_rank() == 0:
        print(*args, **kwargs)


def collect_prompts(argv: List[str]) -> List[str]:
    """Take every word after --prompts verbatim, then hand fire a Python literal of the list.

    fire reads one value per flag and parses it as a literal, so `--prompts "a, b" c` would give
    the tuple ('a', 'b') and lose "c".
    """
    out, prompts, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--prompts":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            prompts, i = argv[i + 1 : j], j
            continue
        if argv[i].startswith("--prompts="):
            prompts = [argv[i].split("=", 1)[1]]
        else:
            out.append(argv[i])
        i += 1
    return out if prompts is None else out + ["--prompts=" + repr(prompts)]


def run(argv: List[str]) -> int:
    return run_cli(main, collect_prompts(argv))


def string_flags(entry: Callable[..., None]) -> Set[str]:
    """The parameters of `entry` typed str or Optional[str]."""
    hints = typing.get_type_hints(entry)
    return {name for name in inspect.signature(entry).parameters if hints.get(name) in (str, Optional[str])}


def keep_strings(entry: Callable[..., None], argv: List[str]) -> List[str]:
    """Hand fire the values of `entry`'s string flags as Python literals of themselves.

    fire parses every value as a literal, so `--api_key 'k#1'` would arrive as "k" (the rest read as a
    comment) and `--model_name 0x1F` as 31.
    """
    names = string_flags(entry)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if name in names and eq:
            out.append(f"{flag}={value!r}")
        elif name in names and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{flag}={argv[i + 1]!r}")
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


INTERRUPTED = 130  # the exit status of a program ended by Ctrl-C (128 + SIGINT), as shells report it


class CtrlC:
    """A SIGINT handler that raises KeyboardInterrupt once and ignores the signals after it: under torchrun
    a terminal's Ctrl-C reaches every rank, and torchrun then sends each the same signal again."""

    def __init__(self):
        self.pressed = False

    def __call__(self, signum, frame) -> None:
        if not self.pressed:
            self.pressed = True
            raise KeyboardInterrupt


def run_cli(entry: Callable[..., None], argv: List[str]) -> int:
    """Run `entry` with fire on the flags in `argv`; a bad input ends every rank with exit status 1
    and a one-line error from rank 0; Ctrl-C ends every rank quietly with exit status 130 (including
    a rank whose collective call broke because another rank left on its Ctrl-C)."""
    rank = env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s")
    ctrl_c = CtrlC()
    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        fire.Fire(entry, command=keep_strings(entry, argv))
    except KeyboardInterrupt:
        return _interrupted(rank)
    except (ValueError, TypeError, OSError, MemoryError, torch.cuda.OutOfMemoryError, RankError) as e:
        if ctrl_c.pressed:
            return _interrupted(rank)
        if rank == 0:
            print(f"error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 1
    except Exception:
        if ctrl_c.pressed:
            return _interrupted(rank)
        raise
    finally:
        interrupted, ctrl_c.pressed = ctrl_c.pressed, True  # from here on a Ctrl-C is ignored
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            # Interrupted, the process is ending: a second Ctrl-C (torchrun forwards one) must not kill it by
            # signal on the way out. Otherwise the caller's handler is back.
            signal.signal(signal.SIGINT, signal.SIG_IGN if interrupted else previous)
    return 0


def _interrupted(rank: int) -> int:
    if rank == 0 and sys.stderr.isatty():
        print(file=sys.stderr)  # the shell's prompt on a line of its own, after the terminal's ^C
    return INTERRUPTED


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
