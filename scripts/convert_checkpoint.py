"""Convert a checkpoint between Meta's layout and Hugging Face's (config.json + safetensors).

    python scripts/convert_checkpoint.py IN_DIR OUT_DIR --to {meta,hf} [--num_shards M]

The input format is detected. --num_shards applies to --to meta. Tensors keep their dtype, wq/wk
are permuted between Meta's interleaved RoPE layout and Hugging Face's rotate-half one, and
tokenizer.model is copied when IN_DIR has one. OUT_DIR appears only once it is complete.
"""
import logging
import sys

import fire

from llama.checkpoint import write_meta
from llama.loading import open_checkpoint
from llama.hf import write_hf


def main(in_dir: str, out_dir: str, to: str, num_shards: int = 1) -> None:
    if to == "meta":
        write_meta(open_checkpoint(in_dir, num_shards), out_dir, num_shards)
    elif to == "hf":
        if num_shards != 1:
            raise ValueError("--num_shards applies to --to meta only: a Hugging Face folder is not model-parallel")
        write_hf(open_checkpoint(in_dir), out_dir)
    else:
        raise ValueError(f"--to={to!r} must be 'meta' or 'hf'")
    print(f"wrote {out_dir} ({to})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fire.Fire(main)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
