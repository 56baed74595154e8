"""`llama-generate`: complete text prompts with a LLaMA checkpoint, on CPU, one GPU or N GPUs.

    llama-generate                                      # the tiny random-weight demo model, no download
    torchrun --nproc_per_node N -m llama.commands.generate --ckpt_dir D --prompts "first" "second" ...

`example.py` at the top of the repository is the same command.
"""
import sys
from typing import List, Optional, Sequence, Union

from llama import cli

DEFAULT_PROMPTS = ["Once upon a time", "The capital of France is"]


def main(
    ckpt_dir: Optional[str] = None,
    prompts: Optional[List[str]] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    stop: Union[str, List[str], None] = None,
    max_gen_len: int = 64,
    stream: bool = False,
    seed: int = 1,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 4,
    tokenizer_path: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    lora: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
    prefix_cache: bool = True,
) -> None:
    """Complete text prompts with a LLaMA checkpoint (Meta, Hugging Face or converted llama2.c folder) and print
    each prompt with its completion. Without --ckpt_dir, a tiny random-weight demo model whose text is gibberish
    by design. Under torchrun every rank runs the model and rank 0 prints.

    Args:
        ckpt_dir: the checkpoint folder (params.json + consolidated.NN.pth, or config.json + *.safetensors).
            Without it: the tiny demo model.
        prompts: one or more prompts, each word after the flag one prompt, taken verbatim (default: two
            story openings).
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling: keep the most likely tokens whose probabilities add up to this.
        top_k: keep only the k most likely tokens before top_p; 0 keeps all.
        min_p: drop the tokens less likely than min_p times the most likely one; 0 keeps all.
        repetition_penalty: divide (multiply, if negative) the logit of every token already in the prompt or the
            answer by this; 1 is none, 1.1 to 1.3 curbs a model that loops.
        presence_penalty: subtract this from the logit of every token already in the answer (-2 to 2).
        frequency_penalty: subtract this times its count from each token's logit in the answer (-2 to 2).
        stop: a stop string, or a JSON list of them ('["\\n", "THE END"]'): the text ends before the first.
        max_gen_len: new tokens per prompt, at most (fewer where the prompt leaves less room in max_seq_len).
        stream: print the text as it is generated, one prompt after another.
        seed: the seed of the sampling; the same seed gives the same text.
        max_seq_len: prompt plus answer, in tokens; default: the checkpoint's own context (2048 when it states
            none).
        max_batch_size: prompts decoded at once.
        tokenizer_path: the tokenizer file; default: the checkpoint folder's.
        model_parallel_size: processes the model is split over; default: all of torchrun's.
        device: cpu, cuda or cuda:N; default: this rank's GPU when there is one, else cpu.
        dtype: float32, bf16 or fp16; default: bf16 (fp16 where unsupported) on a GPU, float32 on a CPU.
        compile: compile the decode step with torch.compile (a C++ compiler is needed on CPU).
        quantize: int8 or int4 weights, quantized as they load.
        group_size: int4's group size: 32, 64, 128 or 256 (default 128, or what divides a layer).
        lora: a PEFT LoRA adapter folder, merged into the weights as they load.
        kv_cache_tokens: positions of the paged KV cache, all prompts together; default: max_batch_size x
            max_seq_len, or what fits in memory.
        prefix_cache: reuse the keys and values of a prompt's start that an earlier one shared (--noprefix_cache
            turns it off).
    """
    from llama import Llama
    from llama.loading import checkpoint_context

    prompts = list(prompts) if prompts is not None else DEFAULT_PROMPTS
    with cli.checkpoint_or_demo(ckpt_dir) as path:
        generator = Llama.build(
            ckpt_dir=path, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
            model_parallel_size=model_parallel_size, seed=seed, device=device, dtype=dtype, compile=compile,
            quantize=quantize, lora=lora, group_size=group_size, kv_cache_tokens=kv_cache_tokens,
            prefix_cache=prefix_cache)
        context = checkpoint_context(path)
    lengths = [len(generator.tokenizer.encode(p, bos=True, eos=False)) for p in prompts]
    if max(lengths) < generator.max_seq_len:  # else generate refuses the prompt, naming it
        cli.gen_len_note(lengths, max_gen_len, generator.max_seq_len, context)
    sampling = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, top_k=top_k, stop=stop, min_p=min_p,
                    repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty)
    if stream:  # one prompt at a time, so each prints as it is written
        for prompt in prompts:
            cli.say(prompt, end="", flush=True)
            for pieces in generator.stream([prompt], **sampling):
                cli.say(pieces[0], end="", flush=True)
            cli.say("\n\n==================================\n", flush=True)
        return
    for prompt, result in zip(prompts, generator.text_completion(prompts, **sampling)):
        cli.say(prompt + result["generation"])
        cli.say("\n==================================\n", flush=True)


def run(argv: Optional[Sequence[str]] = None, prog: str = "llama-generate") -> int:
    return cli.run(main, argv, prog)


if __name__ == "__main__":
    sys.exit(run())
