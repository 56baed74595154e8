"""Write a weight-only int8 copy of a Meta-layout checkpoint (same shard count), atomically.

    python scripts/quantize.py IN_DIR OUT_DIR --mode int8

Every linear weight becomes int8 with one float32 scale per output channel (`NAME.scales`);
embeddings and norms are copied as they are. Llama.build loads the result like any checkpoint.
"""
import sys

import fire

from llama.quantize import quantize_checkpoint


def main(in_dir: str, out_dir: str, mode: str = "int8") -> None:
    path = quantize_checkpoint(in_dir, out_dir, mode)
    print(f"wrote {path} ({mode})")


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
