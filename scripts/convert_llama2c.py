"""Convert a llama2.c checkpoint (the "legacy" float32 .bin format) to Meta's layout.

    python scripts/convert_llama2c.py MODEL.bin TOKENIZER.model OUT_DIR [--num_shards N]

The header is 7 little-endian int32s (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len); a negative vocab_size means an untied output matrix follows the
weights. llama2.c already uses Meta's interleaved RoPE layout, so tensors copy over as they are.
"""
import json
import struct
import sys
from pathlib import Path

import fire
import torch

from llama.checkpoint import ffn_params, write_checkpoint
from llama.model import ModelArgs


def read_llama2c(path: str) -> tuple:
    raw = Path(path).read_bytes()
    if len(raw) < 28:
        raise ValueError(f"{path} is too short to be a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    data = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        n = 1
        for s in shape:
            n *= s
        if offset + n > data.numel():
            raise ValueError(f"{path} ends early: the header promises more weights than the file holds")
        t = data[offset: offset + n].view(*shape).clone()
        offset += n
        return t

    emb = take(vocab, dim)
    stacked = {
        "attention_norm.weight": take(n_layers, dim),
        "attention.wq.weight": take(n_layers, dim, dim),
        "attention.wk.weight": take(n_layers, kv_dim, dim),
        "attention.wv.weight": take(n_layers, kv_dim, dim),
        "attention.wo.weight": take(n_layers, dim, dim),
        "ffn_norm.weight": take(n_layers, dim),
        "feed_forward.w1.weight": take(n_layers, hidden, dim),
        "feed_forward.w2.weight": take(n_layers, dim, hidden),
        "feed_forward.w3.weight": take(n_layers, hidden, dim),
    }
    sd = {"tok_embeddings.weight": emb}
    for i in range(n_layers):
        for name, t in stacked.items():
            sd[f"layers.{i}.{name}"] = t[i].clone()
    sd["norm.weight"] = take(dim)
    take(seq_len * head_dim // 2)  # obsolete RoPE tables (cos, sin)
    take(seq_len * head_dim // 2)
    sd["output.weight"] = emb.clone() if shared else take(vocab, dim)
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "vocab_size": vocab, "norm_eps": 1e-5, "rope_theta": 10000.0, **ffn_params(dim, hidden)}
    return params, sd, seq_len


def main(model_path: str, tokenizer_path: str, out_dir: str, num_shards: int = 1) -> None:
    params, sd, seq_len = read_llama2c(model_path)
    assert ModelArgs.from_params(params).hidden_dim == sd["layers.0.feed_forward.w1.weight"].shape[0]
    write_checkpoint(out_dir, params, sd, num_shards=num_shards, tokenizer_path=tokenizer_path)
    print(f"wrote {out_dir}: {json.dumps(params)} (trained with seq_len {seq_len})")


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
