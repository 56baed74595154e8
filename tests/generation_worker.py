"""Run under torchrun by test_score.py: scoring, stop strings and streaming on this rank's shard."""
import json
import sys

import torch.distributed as dist

from llama import Llama

PAIRS = [("The cat sat on the", " mat and the dog"), ("Once", " upon a time 🦙"), ("", "A big red ball."),
         ("The", " end")]  # more pairs than max_batch_size: two batches
PROMPTS = ["The cat sat on the", "Once 🦙 upon", "A"]


def run(g: Llama) -> dict:
    stop = g.text_completion(PROMPTS[:1], temperature=0, max_gen_len=16)[0]["generation"][5:8]
    return {
        "scores": [list(s) for s in g.score(PAIRS)],
        "perplexity": g.perplexity([c + x for c, x in PAIRS]),
        "stopped": [r["generation"] for r in g.text_completion(PROMPTS, temperature=0, max_gen_len=16, stop=stop)],
        "streamed": [p for p in g.stream(PROMPTS, temperature=0, max_gen_len=16)],
        "sampled": [p for p in g.stream(PROMPTS, temperature=0.8, top_k=20, max_gen_len=16)],
    }


if __name__ == "__main__":
    ckpt_dir, out_prefix = sys.argv[1:]
    g = Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", max_seq_len=64, max_batch_size=3, seed=3)
    with open(f"{out_prefix}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(run(g), f)
    dist.destroy_process_group()
