"""Write a weight-only int8 or int4 copy of a checkpoint in Meta's layout (same shard count), atomically.

    python scripts/quantize.py IN_DIR OUT_DIR --mode int8
    python scripts/quantize.py IN_DIR OUT_DIR --mode int4 [--group_size {32,64,128,256}]

int8: every linear weight becomes int8 with one float32 scale per output channel (`NAME.scales`).
int4: every linear weight becomes 4-bit values, two a byte, with a float32 scale and zero per group
of `group_size` input features (`NAME.group_scales`, `NAME.group_zeros`); unset, the group size is
128, or the largest supported one that divides a layer's in-features (each shard's, for a weight
split along them). Layers no group size divides stay int8, and the log says which. Embeddings and
norms are copied as they are. Llama.build loads the result like any checkpoint, on any process
count its shards (and, for int4, its groups: no group is split between processes) allow.
"""
import logging
import sys
from pathlib import Path
from typing import Optional

from llama import cli
from llama.checkpoint import MetaCheckpoint, linear_inputs, write_checkpoint
from llama.errors import CheckpointError
from llama.loading import open_checkpoint
from llama.quantize import check_mode, describe, plan, quantize_state_dict


def quantize_checkpoint(in_dir: str, out_dir: str, mode: str = "int8", group_size: Optional[int] = None) -> Path:
    check_mode(mode, group_size)
    ckpt = open_checkpoint(in_dir)
    if ckpt.quantized:
        raise CheckpointError(f"{in_dir} is already quantized: pass the float checkpoint")
    num_shards = len(ckpt.files) if isinstance(ckpt, MetaCheckpoint) else 1  # HF files are not shards
    layout = plan(mode, linear_inputs(ckpt.args, num_shards), group_size)
    full = dict(ckpt.rank_tensors(0, 1))
    tokenizer = Path(in_dir) / "tokenizer.model"
    path = write_checkpoint(out_dir, ckpt.params, quantize_state_dict(full, layout), num_shards=num_shards,
                            tokenizer_path=tokenizer if tokenizer.is_file() else None)
    logging.getLogger("quantize").info("%s: %s", path, describe(layout))
    return path


def main(in_dir: str, out_dir: str, mode: str = "int8", group_size: Optional[int] = None) -> None:
    """Write a weight-only int8 or int4 copy of a checkpoint in Meta's layout (same shard count), atomically;
    Llama.build and the commands load it like any checkpoint.

    Args:
        in_dir: the float checkpoint folder to read (Meta or Hugging Face layout).
        out_dir: the folder to write.
        mode: int8 (a scale per output channel) or int4 (a scale and zero per group of input features).
        group_size: int4's group size: 32, 64, 128 or 256 (default 128, or the largest that divides a layer).
    """
    path = quantize_checkpoint(in_dir, out_dir, mode, group_size)
    print(f"wrote {path} ({mode})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
