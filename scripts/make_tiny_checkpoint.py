"""Write a tiny random-weight Meta-layout checkpoint with a freshly trained tokenizer.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--num_shards N] [--seed S]
"""
import fire

from llama.tiny import make_tiny_checkpoint


def main(out_dir: str, num_shards: int = 1, seed: int = 0) -> None:
    path = make_tiny_checkpoint(out_dir, num_shards=num_shards, seed=seed)
    print(f"wrote {path} ({num_shards} shard(s), seed {seed})")


if __name__ == "__main__":
    fire.Fire(main)
