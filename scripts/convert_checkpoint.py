"""Convert a checkpoint between Meta's layout and Hugging Face's (config.json + safetensors).

    python scripts/convert_checkpoint.py IN_DIR OUT_DIR --to {meta,hf} [--num_shards M]
        [--chat_format {llama2,llama3,alpaca}]

The input format is detected. --num_shards applies to --to meta. Tensors keep their dtype, wq/wk
are permuted between Meta's interleaved RoPE layout and Hugging Face's rotate-half one, and
tokenizer.model is copied when IN_DIR has one. --chat_format (--to hf) names the chat format the
model was fine-tuned on, whose template tokenizer_config.json gets (default: a Hugging Face source's
own template, else the tokenizer's format). OUT_DIR appears only once it is complete.
"""
import sys
from typing import Optional

from llama import cli
from llama.checkpoint import write_meta
from llama.loading import open_checkpoint
from llama.hf import write_hf


def main(in_dir: str, out_dir: str, to: str, num_shards: int = 1, chat_format: Optional[str] = None) -> None:
    """Convert a checkpoint folder between Meta's layout and Hugging Face's (config.json + safetensors, with the
    tokenizer files, chat template and generation config transformers reads). OUT_DIR appears only once complete.

    Args:
        in_dir: the checkpoint folder to read (either layout, detected).
        out_dir: the folder to write.
        to: meta or hf.
        num_shards: model-parallel shards to write (--to meta).
        chat_format: llama2, llama3 or alpaca: the chat template to write (--to hf); default: a Hugging Face
            source's own, else the tokenizer's format.
    """
    if to == "meta":
        if chat_format is not None:
            raise ValueError("--chat_format applies to --to hf only: a Meta folder holds no chat template")
        write_meta(open_checkpoint(in_dir, num_shards), out_dir, num_shards)
    elif to == "hf":
        if num_shards != 1:
            raise ValueError("--num_shards applies to --to meta only: a Hugging Face folder is not model-parallel")
        write_hf(open_checkpoint(in_dir), out_dir, chat_format=chat_format)
    else:
        raise ValueError(f"--to={to!r} must be 'meta' or 'hf'")
    print(f"wrote {out_dir} ({to})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
