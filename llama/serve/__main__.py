"""`python -m llama.serve`: the same command as `llama-serve` (llama/commands/serve.py)."""
import sys

from llama.commands.serve import run

sys.exit(run(prog="python -m llama.serve"))
