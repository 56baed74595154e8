"""Run under torchrun by test_cuda.py: build on this rank's GPU (nccl), decode greedily, save what it saw."""
import json
import sys

import torch.distributed as dist

from llama import Llama

PROMPTS = [[1, 5, 9, 200, 31, 7, 64], [1, 77], [1, 300, 301, 302]]

if __name__ == "__main__":
    ckpt_dir, out_prefix = sys.argv[1:]
    g = Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", max_seq_len=256, max_batch_size=3, dtype="float32")
    result = {"backend": dist.get_backend(), "device": str(g.device),
              "greedy": g.generate(PROMPTS, max_gen_len=16, temperature=0)[0]}
    with open(f"{out_prefix}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
