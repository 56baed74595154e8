"""Rewrite a Meta-layout checkpoint with a new number of model-parallel shards.

    python scripts/reshard.py IN_DIR OUT_DIR --num_shards M

M must divide, or be a multiple of, the shard count of IN_DIR, and divide n_kv_heads. params.json
and tokenizer.model are copied; tensors keep their dtype. OUT_DIR appears only once it is complete.
"""
import logging
import sys

import fire

from llama.checkpoint import write_meta
from llama.loading import open_checkpoint


def main(in_dir: str, out_dir: str, num_shards: int) -> None:
    ckpt = open_checkpoint(in_dir, num_shards)
    write_meta(ckpt, out_dir, num_shards)
    print(f"wrote {out_dir}: {len(ckpt.files)} shard(s) -> {num_shards}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fire.Fire(main)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
