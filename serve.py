"""Serve a LLaMA checkpoint over HTTP, an OpenAI-compatible API and a Gradio page, on one process or N:
`llama-serve` from a checkout.

    python serve.py                                     # the tiny random-weight demo model
    python serve.py --ckpt_dir D [--port 8000] [--api_key KEY] ...
    torchrun --nproc_per_node N serve.py --ckpt_dir D ...

Needs the `serve` extra. `python serve.py --help` lists every flag (llama/commands/serve.py).
"""
import sys

from llama.commands.serve import run

if __name__ == "__main__":
    sys.exit(run(prog="serve.py"))
