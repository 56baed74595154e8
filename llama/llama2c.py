"""llama2.c checkpoints (the "legacy" float32 `.bin` format of karpathy/llama2.c) in Meta's layout.

The header is 7 little-endian int32s: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
a negative vocab_size means an untied output matrix follows the weights. Then float32 arrays, back to back,
each stacked over the layers, with PyTorch `nn.Linear` shapes (out, in). llama2.c already uses Meta's
interleaved RoPE layout, so the tensors copy over as they are. `seq_len`, the context the model was trained
with, becomes params.json's `max_seq_len` (the default context of Llama.build and the CLIs).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Dict, Tuple

import torch

from llama.checkpoint import ffn_params, write_checkpoint
from llama.errors import CheckpointError
from llama.model import ModelArgs

HEADER = struct.Struct("<7i")
_PER_LAYER = (  # (name, shape given dim, hidden, kv_dim), in the file's order
    ("attention_norm.weight", lambda d, h, kv: (d,)),
    ("attention.wq.weight", lambda d, h, kv: (d, d)),
    ("attention.wk.weight", lambda d, h, kv: (kv, d)),
    ("attention.wv.weight", lambda d, h, kv: (kv, d)),
    ("attention.wo.weight", lambda d, h, kv: (d, d)),
    ("ffn_norm.weight", lambda d, h, kv: (d,)),
    ("feed_forward.w1.weight", lambda d, h, kv: (h, d)),
    ("feed_forward.w2.weight", lambda d, h, kv: (d, h)),
    ("feed_forward.w3.weight", lambda d, h, kv: (h, d)),
)


def read_llama2c(path: str | os.PathLike) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """params.json fields and Meta-named float32 tensors of a llama2.c checkpoint."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER.size:
        raise CheckpointError(f"{path} is too short to be a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) <= 0 or dim % n_heads:
        raise CheckpointError(f"{path}: the header {HEADER.unpack_from(raw)} is not a llama2.c model's")
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    data = torch.frombuffer(bytearray(raw[HEADER.size:]), dtype=torch.float32)
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        n = 1
        for s in shape:
            n *= s
        if offset + n > data.numel():
            raise CheckpointError(f"{path} ends early: the header promises more weights than the file holds")
        t = data[offset: offset + n].view(*shape)
        offset += n
        return t

    sd = {"tok_embeddings.weight": take(vocab, dim)}
    stacked = {name: take(n_layers, *shape(dim, hidden, kv_dim)) for name, shape in _PER_LAYER}
    for i in range(n_layers):
        for name, t in stacked.items():
            sd[f"layers.{i}.{name}"] = t[i]
    sd["norm.weight"] = take(dim)
    take(seq_len * head_dim // 2)  # obsolete RoPE tables (cos, sin)
    take(seq_len * head_dim // 2)
    sd["output.weight"] = sd["tok_embeddings.weight"] if shared else take(vocab, dim)
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "vocab_size": vocab,
              "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": seq_len, **ffn_params(dim, hidden)}
    if ModelArgs.from_params(params).hidden_dim != hidden:
        raise CheckpointError(f"{path}: hidden_dim {hidden} cannot be expressed in params.json")
    return params, {name: t.clone() for name, t in sd.items()}


def convert_llama2c(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                    num_shards: int = 1) -> Path:
    """Write `model_path` in Meta's layout to `out_dir` (atomically), with `tokenizer_path` as its tokenizer.model."""
    if not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer {str(tokenizer_path)!r} does not exist: pass the SentencePiece "
                                "tokenizer.model the llama2.c model was trained with (e.g. tok512.model)")
    params, sd = read_llama2c(model_path)
    return write_checkpoint(out_dir, params, sd, num_shards=num_shards, tokenizer_path=tokenizer_path)
