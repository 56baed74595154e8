"""Multi-turn chat in the terminal, on CPU, one GPU or N GPUs.

    python chat.py --ckpt_dir D [--tokenizer_path T] [--system "You answer briefly."] \
        [--temperature 0.6] [--top_p 0.9] [--top_k 0] [--max_seq_len 512] [--max_gen_len 256] \
        [--seed 1] [--device cpu] [--dtype bf16] [--lora ADAPTER] [--chat_format {llama2,llama3,alpaca}] \
        [--quantize {int8,int4} [--group_size G]]
    torchrun --nproc_per_node N chat.py --ckpt_dir D ...

The chat format follows the tokenizer (Llama 2 `[INST]` or Llama 3 headers) unless --chat_format
names one; with alpaca, --system is the Input paired with every instruction. Rank 0 reads the
keyboard and broadcasts every line, so all ranks run the same generation; only rank 0 prints.
`/reset` clears the history; `/exit` or Ctrl-D leaves. When the history no longer fits in
max_seq_len with max_gen_len to spare, the oldest exchanges are dropped.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch.distributed as dist

from example import run_cli, say
from llama import Dialog, Llama
from llama.distributed import env_rank
from llama.chat_format import strip_reserved_tags


def read_line() -> Optional[str]:
    """The next line typed on rank 0 (None at end of input), on every rank."""
    line = None
    if env_rank() == 0:
        try:
            line = input("> ")
            if not sys.stdin.isatty():  # piped input: echo it so the transcript reads as typed
                print(line)
        except EOFError:
            print()
    box = [line]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fit_dialog(generator: Llama, system: Optional[str], history: Dialog, max_gen_len: int) -> Optional[Dialog]:
    """The dialog to answer: the system message and `history`, whose oldest exchanges are dropped
    (from `history` too) until the prompt leaves max_gen_len tokens free. None when the last user
    message alone leaves no room for an answer."""
    head = [{"role": "system", "content": system}] if system else []
    while True:
        dialog = head + history
        n = len(generator.encode_dialog(dialog))
        if n + max_gen_len <= generator.max_seq_len or len(history) == 1:
            return dialog if n < generator.max_seq_len else None
        del history[:2]  # the oldest user message and its answer


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    max_seq_len: int = 512,
    max_gen_len: int = 256,
    seed: int = 1,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    lora: Optional[str] = None,
    chat_format: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
) -> None:
    if not isinstance(max_gen_len, int) or not 0 < max_gen_len < max_seq_len:
        raise ValueError(f"max_gen_len={max_gen_len!r} must be a positive integer below max_seq_len={max_seq_len}")
    generator = Llama.build(
        ckpt_dir=str(ckpt_dir),
        tokenizer_path=str(tokenizer_path) if tokenizer_path else None,
        max_seq_len=max_seq_len,
        max_batch_size=1,
        model_parallel_size=model_parallel_size,
        seed=seed,
        device=device,
        dtype=dtype,
        lora=None if lora is None else str(lora),
        chat_format=chat_format,
        quantize=quantize,
        group_size=group_size,
        kv_cache_tokens=kv_cache_tokens,
        prefix_cache=prefix_cache,
    )
    system = None if system is None else str(system)
    history: Dialog = []
    while (line := read_line()) is not None and line.strip() != "/exit":
        if line.strip() == "/reset":
            history.clear()
            say("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            dialog = fit_dialog(generator, system, history, max_gen_len)
        except ValueError as e:  # e.g. a reserved chat tag in the message
            history.pop()
            say(f"(not sent: {e})")
            continue
        if dialog is None:
            history.pop()
            say(f"(not sent: the message does not fit in max_seq_len={max_seq_len}; shorten it)")
            continue
        answer: List[str] = []
        for pieces in generator.stream_chat([dialog], temperature=temperature, top_p=top_p, top_k=top_k,
                                            max_gen_len=max_gen_len):
            say(pieces[0], end="", flush=True)
            answer.append(pieces[0])
        say()
        # A reserved tag the model wrote would make every later prompt refuse the history.
        text = strip_reserved_tags(generator.tokenizer, "".join(answer), generator.chat_format)
        history.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
