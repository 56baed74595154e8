"""Write a weight-only int8 copy of a checkpoint in Meta's layout (same shard count), atomically.

    python scripts/quantize.py IN_DIR OUT_DIR --mode int8

Every linear weight becomes int8 with one float32 scale per output channel (`NAME.scales`);
embeddings and norms are copied as they are. Llama.build loads the result like any checkpoint,
on any process count its shards allow.
"""
import sys
from pathlib import Path

import fire

from llama.checkpoint import MetaCheckpoint, write_checkpoint
from llama.errors import CheckpointError
from llama.loading import open_checkpoint
from llama.quantize import check_mode, quantize_state_dict


def quantize_checkpoint(in_dir: str, out_dir: str, mode: str = "int8") -> Path:
    check_mode(mode)
    ckpt = open_checkpoint(in_dir)
    if ckpt.quantized:
        raise CheckpointError(f"{in_dir} is already quantized: pass the float checkpoint")
    full = dict(ckpt.rank_tensors(0, 1))
    tokenizer = Path(in_dir) / "tokenizer.model"
    num_shards = len(ckpt.files) if isinstance(ckpt, MetaCheckpoint) else 1  # HF files are not shards
    return write_checkpoint(out_dir, ckpt.params, quantize_state_dict(full), num_shards=num_shards,
                            tokenizer_path=tokenizer if tokenizer.is_file() else None)


def main(in_dir: str, out_dir: str, mode: str = "int8") -> None:
    path = quantize_checkpoint(in_dir, out_dir, mode)
    print(f"wrote {path} ({mode})")


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
