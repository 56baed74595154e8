"""Write a tiny random-weight Meta-layout checkpoint with a freshly trained tokenizer.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--num_shards N] [--seed S]
"""
import sys

from llama import cli
from llama.tiny import make_tiny_checkpoint


def main(out_dir: str, num_shards: int = 1, seed: int = 0) -> None:
    """Write a tiny random-weight checkpoint in Meta's layout (the demo model's shape) with a SentencePiece
    tokenizer.model trained on the spot. Its text is gibberish by design: it is for tests and experiments.

    Args:
        out_dir: the folder to write.
        num_shards: model-parallel shards to write.
        seed: the seed of the weights and the tokenizer's corpus.
    """
    path = make_tiny_checkpoint(out_dir, num_shards=num_shards, seed=seed)
    print(f"wrote {path} ({num_shards} shard(s), seed {seed})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
