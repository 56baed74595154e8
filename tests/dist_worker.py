"""Run under torchrun by test_distributed.py (and test_lora.py, with an adapter): build, generate, and save
what this rank saw."""
import sys
from typing import Optional

import torch
import torch.distributed as dist

from llama import Llama

PROMPTS = ["The cat sat on the", "A", "Then the brave little girl ran into the dark forest and"]


def main(ckpt_dir: str, out_prefix: str, lora: Optional[str] = None) -> None:
    g = Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", max_seq_len=64, max_batch_size=4, seed=3, lora=lora)
    tokens = torch.tensor([g.tokenizer.encode(PROMPTS[0], bos=True, eos=False)])
    result = {
        "logits": g.model(tokens, *g.model.layout(1, 0, tokens.shape[1])),
        "greedy": g.text_completion(PROMPTS, temperature=0, max_gen_len=12),
        "sampled": g.text_completion(PROMPTS, temperature=1.0, top_p=0.9, max_gen_len=12),
    }
    torch.save(result, f"{out_prefix}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
