"""Open a checkpoint folder of either layout and load this rank's model from it."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union
from unittest import mock

import torch
from fairscale.nn.model_parallel import layers as fairscale_layers

from llama.checkpoint import MetaCheckpoint
from llama.distributed import available_memory, on_every_rank, setup_model_parallel
from llama.errors import CheckpointError, NonFiniteError, check_positive_int
from llama.hf import HFCheckpoint, is_hf_folder
from llama.model import ModelArgs, Transformer
from llama.numerics import all_finite
from llama.quantize import prepare_for_state_
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
               quantize: Optional[str] = None) -> Tuple[Transformer, AnyTokenizer]:
    """This rank's model, loaded and ready to decode, and the tokenizer. Files, which hosts may see
    differently, are checked first, and every rank agrees on the outcome before loading, so a bad
    input fails on every rank alike."""
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
        return ckpt, tokenizer, args

    ckpt, tokenizer, args = on_every_rank(open_files)
    with _skip_fairscale_init():
        model = Transformer(args)
    if ckpt.quantized:
        prepare_for_state_(model, ckpt.names)  # int8 layout for a checkpoint from scripts/quantize.py

    def load() -> None:  # what one rank can fail at alone: its own files, its own memory
        _load_weights(model, ckpt.rank_tensors(rank, mp_size, dtype, device, log_progress=rank == 0), ckpt_dir)
        _check_cache_fits(args, mp_size, dtype, device)

    on_every_rank(load)
    model.to(device)  # buffers (RoPE table)
    model.eval().requires_grad_(False)
    model.setup_cache(max_batch_size, max_seq_len, device, dtype)
    with _skip_fairscale_init():  # fusing builds new parallel layers
        model.optimize_(quantize=quantize, compile=compile)
    log.info("loaded %s (%d file(s), %s on %s) in %.2f s", ckpt_dir, len(ckpt.files), dtype, device,
             time.perf_counter() - start)
    return model, tokenizer


@contextlib.contextmanager
def _skip_fairscale_init() -> Iterator[None]:
    """Build fairscale layers without filling their weights, which the checkpoint replaces anyway."""
    with mock.patch.object(fairscale_layers, "_initialize_affine_weight", lambda *args, **kwargs: None):
        yield


def kv_cache_bytes(args: ModelArgs, mp_size: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's KV cache: keys and values for every layer, batch row and position."""
    per_token = 2 * args.n_layers * (args.n_kv_heads // mp_size) * args.head_dim * dtype.itemsize
    return per_token * args.max_batch_size * args.max_seq_len


def _check_cache_fits(args: ModelArgs, mp_size: int, dtype: torch.dtype, device: torch.device) -> None:
    need, free = kv_cache_bytes(args, mp_size, dtype), available_memory(device)
    if free is not None and need > 0.9 * free:
        gib = 2**30
        raise MemoryError(
            f"the KV cache for max_batch_size={args.max_batch_size} x max_seq_len={args.max_seq_len} needs "
            f"{need / gib:.2f} GiB on {device} but only {free / gib:.2f} GiB is free after loading the weights: "
            f"lower max_batch_size or max_seq_len (the cache grows with their product), or use more processes")


def _load_weights(model: Transformer, tensors: Iterable[Tuple[str, torch.Tensor]], source) -> None:
    """Swap each tensor into the model as it arrives, so the placeholder it replaces is freed
    before the next one is read: loading never holds two copies of the weights. A weight with
    NaN or inf is refused by name rather than left to turn into garbage text."""
    expected = {name: t.shape for name, t in model.state_dict().items()}  # shapes only: no references
    seen = set()
    for name, tensor in tensors:
        if tensor.shape != expected.get(name):
            raise CheckpointError(f"{source}: {name} of shape {tuple(tensor.shape)} does not fit the model "
                                  f"(expected {expected.get(name)})")
        if not all_finite(tensor):
            raise NonFiniteError(f"{source}: {name} holds NaN or inf values: the checkpoint is damaged; download "
                                 "or convert it again")
        module, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module)
        # int8 weights and their scales are buffers (llama.quantize); everything else a parameter
        setattr(owner, leaf, tensor if leaf in owner._buffers else torch.nn.Parameter(tensor, requires_grad=False))
        seen.add(name)
    if seen != set(expected):
        raise CheckpointError(f"{source}: no weights for {sorted(set(expected) - seen)[:5]}")
