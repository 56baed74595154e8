"""Download a checkpoint from the Hugging Face Hub: the same command as `python -m llama.download`.

    python scripts/download.py stories15M
    python scripts/download.py meta-llama/Llama-2-7b --include "original/*" --dir llama-2-7b
"""
import sys

from llama import cli
from llama.download import main

if __name__ == "__main__":
    sys.exit(cli.run(main))
