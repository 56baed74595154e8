"""Multi-turn chat in the terminal, on CPU, one GPU or N GPUs: `llama-chat` from a checkout.

    python chat.py --ckpt_dir D [--system "You answer briefly."] [--temperature 0.6] ...
    torchrun --nproc_per_node N chat.py --ckpt_dir D ...

`python chat.py --help` lists every flag (llama/commands/chat.py).
"""
import sys

from llama.commands.chat import run

if __name__ == "__main__":
    sys.exit(run(prog="chat.py"))
