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
from llama.distributed import (available_memory, on_every_rank, parallelize_, setup_model_parallel,
                               smallest_on_every_rank)
from llama.errors import CheckpointError, NonFiniteError, check_positive_int
from llama.hf import HFCheckpoint, is_hf_folder
from llama.lora import open_adapter
from llama.model import BLOCK_SIZE, ModelArgs, Transformer
from llama.numerics import all_finite
from llama.quantize import describe, pack_int4_, pack_linears_, plan, prepare_quantized_, quantize_model_
from llama.tokenizer import AnyTokenizer, find_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048  # the context of a checkpoint that states none (Llama 1's; every Llama has at least that)


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


def checkpoint_context(ckpt_dir: str | os.PathLike) -> Optional[int]:
    """The context a checkpoint folder states, in tokens: params.json's `max_seq_len` (convert_llama2c.py writes
    it from the llama2.c header), or config.json's `max_position_embeddings`; None when it states none or the
    folder cannot be read (loading it will say why)."""
    from llama.checkpoint import read_json

    folder = Path(ckpt_dir)
    for name, key in (("params.json", "max_seq_len"), ("config.json", "max_position_embeddings")):
        if (folder / name).is_file():
            try:
                value = read_json(folder / name).get(key)
            except (CheckpointError, OSError):
                return None
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    return None


def resolve_max_seq_len(max_seq_len: Optional[int], context: Optional[int]) -> int:
    """`max_seq_len` as given, else the checkpoint's context, else DEFAULT_MAX_SEQ_LEN; a warning when it is given
    beyond the checkpoint's context (the model never saw such positions: its text degrades past them)."""
    if max_seq_len is None:
        return context or DEFAULT_MAX_SEQ_LEN
    if context is not None and max_seq_len > context:
        log.warning("max_seq_len=%d is beyond the %d tokens this checkpoint was trained with: text past them degrades",
                    max_seq_len, context)
    return max_seq_len


def load_model(ckpt_dir: str, tokenizer_path: Optional[str], max_seq_len: Optional[int], max_batch_size: int,
               mp_size: int, device: torch.device, dtype: torch.dtype, compile: bool = False,
               quantize: Optional[str] = None, lora: Optional[str] = None,
               group_size: Optional[int] = None, kv_cache_tokens: Optional[int] = None
               ) -> Tuple[Transformer, AnyTokenizer]:
    """This rank's model, loaded and ready to decode, and the tokenizer. `max_seq_len` None: the checkpoint's own
    context (resolve_max_seq_len).

    Files, which hosts may see differently, are checked first, and every rank agrees on the outcome
    before loading, so a bad input fails on every rank alike. The model is built without memory for
    its weights; each checkpoint tensor is then copied straight into its place (a fused wqkv / w13
    takes its parts as rows), so loading holds one copy of the weights. `lora`, a PEFT adapter
    folder, is merged into each tensor as it is read (llama.lora), before any quantizing. `quantize`
    ("int8", "int4" with `group_size`) quantizes the loaded weights; a checkpoint from
    scripts/quantize.py is loaded as it is. int4 weights are then laid out for the device's kernel,
    and on CPU bf16 and int8 ones for fbgemm's (llama.quantize.pack_linears_). The KV cache holds
    `kv_cache_tokens` positions (see cache_blocks).
    """
    tokenizer_path = find_tokenizer(ckpt_dir, tokenizer_path)
    start = time.perf_counter()
    rank, mp_size = setup_model_parallel(mp_size, device)

    def open_files():  # hosts may see different files: agree before the heavy work
        ckpt = open_checkpoint(ckpt_dir, mp_size)
        tokenizer = load_tokenizer(tokenizer_path)
        seq_len = resolve_max_seq_len(max_seq_len, checkpoint_context(ckpt_dir))
        args = dataclasses.replace(ckpt.args, max_seq_len=seq_len, max_batch_size=max_batch_size)
        args.validate()  # max_seq_len and max_batch_size within bounds too
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
        model = parallelize_(Transformer(args))
        if ckpt.quantized:
            prepare_quantized_(model, ckpt.layout)  # the layout of a checkpoint from scripts/quantize.py
    on_every_rank(lambda: check_weights_fit(model, ckpt_dir, device, dtype))
    materialize_(model, device, dtype)

    def load() -> int:  # what one rank can fail at alone: its own files, its own memory
        tensors = ckpt.rank_tensors(rank, mp_size, dtype, device, log_progress=rank == 0,
                                    into=model.checkpoint_target)
        if adapter is not None:  # LoRA: merged into each tensor in place, before quantizing
            tensors = adapter.merged(tensors, rank, mp_size)
        check_finite(tensors, ckpt_dir)
        return cache_blocks(args, kv_cache_tokens, mp_size, dtype, device)

    num_blocks = smallest_on_every_rank(on_every_rank(load))  # rank 0 hands out blocks every rank has
    model.eval()
    if quantize is not None:
        quantize_model_(model, layout)
    pack_int4_(model)
    if device.type == "cpu":
        pack_linears_(model)
    model.setup_cache(num_blocks, BLOCK_SIZE, args.max_seq_len, device, dtype)
    if compile:
        model.compile_()
    log.info("loaded %s (%d file(s), %s%s on %s) in %.2f s", ckpt_dir, len(ckpt.files), dtype,
             "" if not (layout or ckpt.layout) else f", {describe(layout or ckpt.layout)} weights", device,
             time.perf_counter() - start)
    return model, tokenizer


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes `materialize_` gives a model built on the meta device: floating point tensors in `dtype`."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in tensors)


def estimate_bytes(ckpt_dir: str | os.PathLike, max_seq_len: Optional[int] = None, max_batch_size: int = 4,
                   mp_size: int = 1, dtype: torch.dtype = torch.float32, quantize: Optional[str] = None,
                   group_size: Optional[int] = None, kv_cache_tokens: Optional[int] = None) -> int:
    """Bytes one rank of a checkpoint would hold once loaded as `load_model` loads it: its weights (in `dtype`,
    or quantized as asked) and its KV cache, from the checkpoint's shapes alone (no weight is read). A
    budget of several models (llama.pool) plans with it before loading."""
    ckpt = open_checkpoint(ckpt_dir, mp_size)
    seq_len = max_seq_len or checkpoint_context(ckpt_dir) or DEFAULT_MAX_SEQ_LEN
    args = dataclasses.replace(ckpt.args, max_seq_len=seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"):
        model = Transformer(args)
        layout = ckpt.layout if ckpt.quantized else None
        if layout is None and quantize is not None:
            layout = plan(quantize, linear_inputs(args, 1), group_size)
        if layout is not None:
            prepare_quantized_(model, layout)
    tokens = kv_cache_tokens or max_batch_size * seq_len
    blocks = 1 + -(-tokens // BLOCK_SIZE)
    return weight_bytes(model, dtype) // mp_size + kv_cache_bytes(args, mp_size, dtype, blocks * BLOCK_SIZE)


def model_bytes(model: nn.Module) -> int:
    """Bytes a loaded model holds: its weights (quantized and packed ones included), KV cache and RoPE table."""
    from llama.quantize import PackedLinear

    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t is not None}
    packed = sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear))  # fbgemm's objects, not tensors
    return sum(t.numel() * t.element_size() for t in tensors.values()) + packed


def check_weights_fit(model: nn.Module, source, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse to allocate weights that do not fit in the memory still free (as check_cache_fits does for
    the KV cache), instead of failing in the allocator or the kernel's OOM killer."""
    need, free = weight_bytes(model, dtype), available_memory(device)
    if free is not None and need > 0.9 * free:
        gib = 2**30
        raise MemoryError(f"the weights of {source} need {need / gib:.2f} GiB on {device} (this rank's share, in "
                          f"{str(dtype).replace('torch.', '')}) but only {free / gib:.2f} GiB is free: use more "
                          "model-parallel processes, a 16-bit dtype, or a machine with more memory")


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


def kv_cache_bytes(args: ModelArgs, mp_size: int, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of one rank's KV cache for `tokens` positions: keys and values for every layer."""
    return 2 * args.n_layers * (args.n_kv_heads // mp_size) * args.head_dim * dtype.itemsize * tokens


def cache_blocks(args: ModelArgs, kv_cache_tokens: Optional[int], mp_size: int, dtype: torch.dtype,
                 device: torch.device) -> int:
    """The KV cache's blocks (the padding block included) for `kv_cache_tokens` positions, all sequences
    together; by default max_batch_size x max_seq_len, or as many as 90% of the memory left after the
    weights holds, if fewer, but never fewer than one max_seq_len sequence's."""
    per_token = kv_cache_bytes(args, mp_size, dtype, 1)
    free = available_memory(device)
    room = None if free is None else int(0.9 * free) // per_token
    capped = False
    if kv_cache_tokens is None:
        tokens = args.max_batch_size * args.max_seq_len
        if room is not None and room < tokens:
            tokens, capped = max(room, args.max_seq_len), True
    else:
        tokens = check_positive_int("kv_cache_tokens", kv_cache_tokens)
        if tokens < args.max_seq_len:
            raise ValueError(f"kv_cache_tokens={tokens} is less than max_seq_len={args.max_seq_len}: the cache "
                             "must hold at least one whole sequence; raise kv_cache_tokens or lower max_seq_len")
    if room is not None and tokens > room:
        fix = ("lower max_seq_len (by default the checkpoint's context; the cache holds at least one whole "
               "sequence)" if kv_cache_tokens is None
               else "lower kv_cache_tokens")
        raise MemoryError(f"the KV cache for {tokens} positions needs {_size(per_token * tokens)} on {device} but "
                          f"only {_size(free)} is free after loading the weights: {fix}, or use more processes")
    if capped:
        log.warning("the KV cache gets %d positions, the most that fit on %s, rather than max_batch_size=%d x "
                    "max_seq_len=%d: requests beyond what it holds wait", tokens, device, args.max_batch_size,
                    args.max_seq_len)
    return 1 + -(-tokens // BLOCK_SIZE)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
