"""Open a checkpoint folder of either layout and load this rank's model from it."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import torch
from torch import nn

from llama.checkpoint import MetaCheckpoint, linear_inputs
from llama.distributed import available_memory, on_every_rank, setup_model_parallel
from llama.errors import CheckpointError, NonFiniteError, check_positive_int
from llama.hf import HFCheckpoint, is_hf_folder
from llama.lora import open_adapter
from llama.model import ModelArgs, Transformer
from llama.numerics import all_finite
from llama.quantize import describe, pack_int4_, pack_linears_, plan, prepare_quantized_, quantize_model_
from llama.tokenizer import AnyTokenizer, find_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def open_checkpoint(ckpt_dir: str | os.PathLike, world_size: int = 1) -> Union[MetaCheckpoint, HFCheckpoint]:
    """Validate a Meta or Hugging Face checkpoint folder for `world_size` model-parallel ranks."""
    check_positive_int("world_size", world_size)
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist: pass --ckpt_dir with a Meta "
                                "(params.json + consolidated.NN.pth) or Hugging Face (config.json + "
                                "*.safetensors) checkpoint folder")
    if (folder / "params.json").exists() or any(folder.glob("consolidated.*.pth")):
        return MetaCheckpoint(folder, world_size)
    if is_hf_folder(folder):
        return HFCheckpoint(folder, world_size)
    raise CheckpointError(f"{folder} holds neither a Meta checkpoint (params.json is missing, and no "
                          "consolidated.NN.pth) nor a Hugging Face one (no config.json): point --ckpt_dir at "
                          "a checkpoint folder")



def load_model(ckpt_dir: str, tokenizer_path: Optional[str], max_seq_len: int, max_batch_size: int, mp_size: int,
               device: torch.device, dtype: torch.dtype, compile: bool = False,
               quantize: Optional[str] = None, lora: Optional[str] = None,
               group_size: Optional[int] = None) -> Tuple[Transformer, AnyTokenizer]:
    """This rank's model, loaded and ready to decode, and the tokenizer.

    Files, which hosts may see differently, are checked first, and every rank agrees on the outcome
    before loading, so a bad input fails on every rank alike. The model is built without memory for
    its weights; each checkpoint tensor is then copied straight into its place (a fused wqkv / w13
    takes its parts as rows), so loading holds one copy of the weights. `lora`, a PEFT adapter
    folder, is merged into each tensor as it is read (llama.lora), before any quantizing. `quantize`
    ("int8", "int4" with `group_size`) quantizes the loaded weights; a checkpoint from
    scripts/quantize.py is loaded as it is. int4 weights are then laid out for the device's kernel,
    and on CPU bf16 and int8 ones for fbgemm's (llama.quantize.pack_linears_).
    """
    tokenizer_path = find_tokenizer(ckpt_dir, tokenizer_path)
    start = time.perf_counter()
    rank, mp_size = setup_model_parallel(mp_size, device)

    def open_files():  # hosts may see different files: agree before the heavy work
        ckpt = open_checkpoint(ckpt_dir, mp_size)
        tokenizer = load_tokenizer(tokenizer_path)
        args = dataclasses.replace(ckpt.args, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if tokenizer.n_words > args.vocab_size:
            raise CheckpointError(
                f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model's vocab_size is "
                f"{args.vocab_size}: use the tokenizer.model that came with the checkpoint")
        adapter = None if lora is None else open_adapter(lora, ckpt)  # LoRA: validated before any weight is read
        if quantize is not None and ckpt.quantized:
            raise CheckpointError(f"{ckpt_dir} is already quantized ({describe(ckpt.layout)}): load it without "
                                  f"quantize, or pass the float checkpoint to quantize it as {quantize}")
        layout = None if quantize is None else plan(quantize, linear_inputs(args, mp_size), group_size)
        return ckpt, tokenizer, args, adapter, layout

    ckpt, tokenizer, args, adapter, layout = on_every_rank(open_files)
    with torch.device("meta"):
        model = Transformer(args)
        if ckpt.quantized:
            prepare_quantized_(model, ckpt.layout)  # the layout of a checkpoint from scripts/quantize.py
    materialize_(model, device, dtype)

    def load() -> None:  # what one rank can fail at alone: its own files, its own memory
        tensors = ckpt.rank_tensors(rank, mp_size, dtype, device, log_progress=rank == 0,
                                    into=model.checkpoint_target)
        if adapter is not None:  # LoRA: merged into each tensor in place, before quantizing
            tensors = adapter.merged(tensors, rank, mp_size)
        check_finite(tensors, ckpt_dir)
        check_cache_fits(args, mp_size, dtype, device)

    on_every_rank(load)
    model.eval()
    if quantize is not None:
        quantize_model_(model, layout)
    pack_int4_(model)
    if device.type == "cpu":
        pack_linears_(model)
    model.setup_cache(max_batch_size, max_seq_len, device, dtype)
    if compile:
        model.compile_()
    log.info("loaded %s (%d file(s), %s%s on %s) in %.2f s", ckpt_dir, len(ckpt.files), dtype,
             "" if not (layout or ckpt.layout) else f", {describe(layout or ckpt.layout)} weights", device,
             time.perf_counter() - start)
    return model, tokenizer


def materialize_(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every weight of a model built on the meta device uninitialized memory on `device`: floating
    point ones in `dtype`, int8 ones as they are. The pages are touched, and so resident, only as the
    checkpoint fills them."""
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            empty = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(empty, requires_grad=False)
            else:
                module._buffers[name] = empty


def check_finite(tensors: Iterable[Tuple[str, torch.Tensor]], source) -> None:
    """Consume `tensors`, refusing by name any that holds NaN or inf rather than let it turn into
    garbage text."""
    for name, tensor in tensors:
        if not all_finite(tensor):
            raise NonFiniteError(f"{source}: {name} holds NaN or inf values: the checkpoint is damaged; download "
                                 "or convert it again")


def kv_cache_bytes(args: ModelArgs, mp_size: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's KV cache: keys and values for every layer, batch row and position."""
    per_token = 2 * args.n_layers * (args.n_kv_heads // mp_size) * args.head_dim * dtype.itemsize
    return per_token * args.max_batch_size * args.max_seq_len


def check_cache_fits(args: ModelArgs, mp_size: int, dtype: torch.dtype, device: torch.device) -> None:
    need, free = kv_cache_bytes(args, mp_size, dtype), available_memory(device)
    if free is not None and need > 0.9 * free:
        gib = 2**30
        raise MemoryError(
            f"the KV cache for max_batch_size={args.max_batch_size} x max_seq_len={args.max_seq_len} needs "
            f"{need / gib:.2f} GiB on {device} but only {free / gib:.2f} GiB is free after loading the weights: "
            f"lower max_batch_size or max_seq_len (the cache grows with their product), or use more processes")
