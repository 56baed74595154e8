"""`llama-chat`: a multi-turn chat in the terminal, on CPU, one GPU or N GPUs.

    llama-chat --ckpt_dir D [--system "You answer briefly."] [--temperature 0.6] ...
    torchrun --nproc_per_node N -m llama.commands.chat --ckpt_dir D ...

`chat.py` at the top of the repository is the same command. Rank 0 reads the keyboard and broadcasts every
line, so all ranks run the same generation; only rank 0 prints.
"""
import sys
from typing import List, Optional, Sequence

from llama import cli


def read_line() -> Optional[str]:
    """The next line typed on rank 0 (None at end of input), on every rank."""
    import torch.distributed as dist

    line = None
    if cli.is_rank0():
        try:
            line = input("> ")
            if not sys.stdin.isatty():  # piped input: echo it so the transcript reads as typed
                print(line)
        except EOFError:
            print()
    box = [line]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fit_dialog(generator, system: Optional[str], history: list, max_gen_len: int) -> Optional[list]:
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
    ckpt_dir: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    max_gen_len: int = 256,
    seed: int = 1,
    max_seq_len: Optional[int] = None,
    chat_format: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    lora: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
) -> None:
    """Chat with a LLaMA checkpoint in the terminal: type a message, the answer streams back, and the conversation
    so far goes with each new message. /reset clears the history; /exit or Ctrl-D leaves. When the history no
    longer fits in --max_seq_len with --max_gen_len to spare, the oldest exchanges are dropped. The chat format
    follows the tokenizer (Llama 2 [INST] or Llama 3 headers) unless --chat_format names one.

    Args:
        ckpt_dir: the checkpoint folder (Meta or Hugging Face layout). Without it: the tiny demo model, whose
            answers are gibberish by design.
        system: a system message sent with every turn (with --chat_format alpaca: the Input of every
            instruction).
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling: keep the most likely tokens whose probabilities add up to this.
        top_k: keep only the k most likely tokens before top_p; 0 keeps all.
        min_p: drop the tokens less likely than min_p times the most likely one; 0 keeps all.
        repetition_penalty: divide (multiply, if negative) the logit of every token already in the prompt or the
            answer by this; 1 is none, 1.1 to 1.3 curbs a model that loops.
        presence_penalty: subtract this from the logit of every token already in the answer (-2 to 2).
        frequency_penalty: subtract this times its count from each token's logit in the answer (-2 to 2).
        max_gen_len: new tokens per answer, at most.
        seed: the seed of the sampling.
        max_seq_len: the conversation plus the answer, in tokens; default: the checkpoint's own context
            (2048 when it states none).
        chat_format: llama2, llama3 or alpaca; default: the tokenizer's.
        tokenizer_path: the tokenizer file; default: the checkpoint folder's.
        model_parallel_size: processes the model is split over; default: all of torchrun's.
        device: cpu, cuda or cuda:N; default: this rank's GPU when there is one, else cpu.
        dtype: float32, bf16 or fp16; default: bf16 (fp16 where unsupported) on a GPU, float32 on a CPU.
        quantize: int8 or int4 weights, quantized as they load.
        group_size: int4's group size: 32, 64, 128 or 256.
        lora: a PEFT LoRA adapter folder, merged into the weights as they load.
        kv_cache_tokens: positions of the paged KV cache; default: max_seq_len, or what fits in memory.
        prefix_cache: reuse the keys and values of the conversation so far at each turn, rather than compute them
            again (--noprefix_cache turns it off).
    """
    from llama import Llama
    from llama.chat_format import strip_reserved_tags
    from llama.errors import check_positive_int

    check_positive_int("max_gen_len", max_gen_len)
    if max_seq_len is not None and max_gen_len >= max_seq_len:
        raise ValueError(f"max_gen_len={max_gen_len} must be below max_seq_len={max_seq_len}")
    with cli.checkpoint_or_demo(ckpt_dir) as path:
        generator = Llama.build(
            ckpt_dir=path, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1,
            model_parallel_size=model_parallel_size, seed=seed, device=device, dtype=dtype, lora=lora,
            chat_format=chat_format, quantize=quantize, group_size=group_size, kv_cache_tokens=kv_cache_tokens,
            prefix_cache=prefix_cache)
    if max_gen_len >= generator.max_seq_len:
        raise ValueError(f"max_gen_len={max_gen_len} must be below max_seq_len={generator.max_seq_len} (the "
                         "checkpoint's context): pass a smaller max_gen_len")
    history: List[dict] = []
    while (line := read_line()) is not None and line.strip() != "/exit":
        if line.strip() == "/reset":
            history.clear()
            cli.say("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            dialog = fit_dialog(generator, system, history, max_gen_len)
        except ValueError as e:  # e.g. a reserved chat tag in the message
            history.pop()
            cli.say(f"(not sent: {e})")
            continue
        if dialog is None:
            history.pop()
            cli.say(f"(not sent: the message does not fit in --max_seq_len={generator.max_seq_len}; shorten it)")
            continue
        room = generator.max_seq_len - len(generator.encode_dialog(dialog))
        if room < max_gen_len:
            cli.note(f"this answer stops after {room} tokens, where the conversation reaches "
                     f"--max_seq_len={generator.max_seq_len}")
        answer: List[str] = []
        for pieces in generator.stream_chat([dialog], temperature=temperature, top_p=top_p, top_k=top_k,
                                            max_gen_len=max_gen_len, min_p=min_p,
                                            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                            frequency_penalty=frequency_penalty):
            cli.say(pieces[0], end="", flush=True)
            answer.append(pieces[0])
        cli.say()
        # A reserved tag the model wrote would make every later prompt refuse the history.
        text = strip_reserved_tags(generator.tokenizer, "".join(answer), generator.chat_format)
        history.append({"role": "assistant", "content": text})


def run(argv: Optional[Sequence[str]] = None, prog: str = "llama-chat") -> int:
    return cli.run(main, argv, prog)


if __name__ == "__main__":
    sys.exit(run())
