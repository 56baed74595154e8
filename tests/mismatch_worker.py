"""Run under torchrun by test_reliability.py: rank 1 is handed a different or a bad prompt, or
crashes in the middle of generating."""
import sys

import torch.distributed as dist

from llama import Llama


def main(ckpt_dir: str, case: str) -> None:
    g = Llama.build(ckpt_dir, max_seq_len=32, max_batch_size=2)
    prompt = "The cat"
    if case == "crash" and dist.get_rank() == 1:
        calls = iter(range(1000))
        logits = g.model.logits

        def failing(h, *adapters):  # as an out-of-memory would, three steps in, on this rank only
            if next(calls) == 3:
                raise RuntimeError("simulated out of memory on rank 1")
            return logits(h, *adapters)

        g.model.logits = failing
    elif dist.get_rank() == 1:
        prompt = "The dog" if case == "different" else "word " * 100
    try:
        g.text_completion([prompt], temperature=0, max_gen_len=4)
    except ValueError as e:
        print(f"rank {dist.get_rank()} raised: {e}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])
