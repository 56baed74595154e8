"""Rewrite a Meta-layout checkpoint with a new number of model-parallel shards.

    python scripts/reshard.py IN_DIR OUT_DIR --num_shards M

M must divide, or be a multiple of, the shard count of IN_DIR, and divide n_kv_heads. params.json
and tokenizer.model are copied; tensors keep their dtype. OUT_DIR appears only once it is complete.
"""
import sys

from llama import cli
from llama.checkpoint import write_meta
from llama.loading import open_checkpoint


def main(in_dir: str, out_dir: str, num_shards: int) -> None:
    """Rewrite a Meta-layout checkpoint with a new number of model-parallel shards (a divisor or multiple of its
    own). params.json and tokenizer.model are copied; tensors keep their dtype. OUT_DIR appears only once complete.

    Args:
        in_dir: the checkpoint folder to read.
        out_dir: the folder to write.
        num_shards: model-parallel shards to write.
    """
    ckpt = open_checkpoint(in_dir, num_shards)
    write_meta(ckpt, out_dir, num_shards)
    print(f"wrote {out_dir}: {len(ckpt.files)} shard(s) -> {num_shards}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
