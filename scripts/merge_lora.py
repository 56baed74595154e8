"""Merge a PEFT LoRA adapter into a checkpoint and write the result as a plain checkpoint.

    python scripts/merge_lora.py BASE ADAPTER OUT [--to {meta,hf}] [--num_shards M]
        [--chat_format {llama2,llama3,alpaca}]

BASE is a Meta-layout or Hugging Face folder, ADAPTER a PEFT adapter folder (adapter_config.json
+ adapter_model.safetensors or .bin). --to defaults to BASE's own layout; --num_shards (for
--to meta) to BASE's shard count. Tensors keep BASE's dtypes, each merged in float32 as it is
read, so memory stays near one tensor. OUT appears only once it is complete; the merged folder
loads without --lora and gives the same model as BASE with --lora ADAPTER. --chat_format (--to hf)
names the format the adapter was trained on (e.g. alpaca), whose chat template the folder gets.
"""
import sys
from typing import Optional

from llama import cli
from llama.checkpoint import MetaCheckpoint, write_meta
from llama.hf import write_hf
from llama.loading import open_checkpoint
from llama.lora import MergedCheckpoint, open_adapter


def main(base: str, adapter: str, out: str, to: Optional[str] = None, num_shards: Optional[int] = None,
         chat_format: Optional[str] = None) -> None:
    """Merge a PEFT LoRA adapter into a checkpoint and write the result as a plain checkpoint, which loads without
    --lora and gives the same model. OUT appears only once complete.

    Args:
        base: the base checkpoint folder (Meta or Hugging Face layout).
        adapter: the PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin).
        out: the folder to write.
        to: meta or hf; default: the base's own layout.
        num_shards: model-parallel shards to write (--to meta); default: the base's.
        chat_format: llama2, llama3 or alpaca: the chat template to write (--to hf), e.g. the format the
            adapter was trained on.
    """
    base_ckpt = open_checkpoint(base)
    meta_base = isinstance(base_ckpt, MetaCheckpoint)
    to = to or ("meta" if meta_base else "hf")
    if to not in ("meta", "hf"):
        raise ValueError(f"--to={to!r} must be 'meta' or 'hf'")
    if to == "hf" and num_shards not in (None, 1):
        raise ValueError("--num_shards applies to --to meta only: a Hugging Face folder is not model-parallel")
    if to == "meta" and chat_format is not None:
        raise ValueError("--chat_format applies to --to hf only: a Meta folder holds no chat template")
    num_shards = num_shards or (len(base_ckpt.files) if meta_base else 1)
    ckpt = open_checkpoint(base, num_shards) if to == "meta" else base_ckpt  # checks the split fits
    merged = MergedCheckpoint(ckpt, open_adapter(adapter, ckpt))
    if to == "meta":
        write_meta(merged, out, num_shards)
    else:
        write_hf(merged, out, chat_format=chat_format)
    print(f"wrote {out} ({to}): {base} with {adapter} merged")


if __name__ == "__main__":
    sys.exit(cli.run(main))
