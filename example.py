"""Complete text prompts with a LLaMA checkpoint, on CPU, one GPU or N GPUs: `llama-generate` from a checkout.

    python example.py                                   # the tiny random-weight demo model, no download
    torchrun --nproc_per_node N example.py --ckpt_dir D --prompts "first prompt" "second prompt" \
        [--temperature 0.6] [--top_p 0.9] [--max_gen_len 64] [--seed 1] ...

`python example.py --help` lists every flag (llama/commands/generate.py).
"""
import sys

from llama.commands.generate import run

if __name__ == "__main__":
    sys.exit(run(prog="example.py"))
