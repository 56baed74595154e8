"""The LLaMA transformer: RMSNorm, RoPE, grouped-query attention over a paged KV cache, SwiGLU.

One forward serves prefill, decode and scoring, eagerly or compiled: tokens (B, T) at positions
(B, T), and optionally each row's LoRA adapter (`adapters` (B,): see llama.adapters, which wraps the
linears and the embedding to take it). Each layer's KV cache is a pool of blocks of `block_size`
positions; row b writes its tokens' keys and values to the cache slots `slots` (B, T) (block *
block_size + offset) and reads its keys through its block table (B, W): its positions j * block_size
... (j + 1) * block_size - 1 live in block `block_table[b, j]`. Block 0 holds no sequence: tables are padded with it, and
padding tokens write there.

The model is built with plain linears; `llama.distributed.parallelize_` turns it into fairscale's
column- and row-parallel layers for model parallelism. Parameter names follow Meta's
`consolidated.NN.pth` checkpoints, except that wq/wk/wv are one `wqkv` and w1/w3 one `w13` (one
matmul each per step); `load_state_dict` takes Meta's names too.
"""
from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.errors import check_positive_int

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # positions per KV-cache block

# Bounds on each size a checkpoint declares: several times the largest LLaMA (405B: dim 16384, 126 layers,
# 128 heads, a 128256-token vocabulary, a feed-forward width of 53248), and far below what would exhaust
# memory merely to list the model's tensors.
LIMITS = {
    "dim": (1, 65536), "n_layers": (1, 1024), "n_heads": (1, 1024), "n_kv_heads": (1, 1024),
    "vocab_size": (1, 1 << 20), "multiple_of": (1, 1 << 18), "rope_original_max_seq_len": (1, 1 << 24),
    "max_batch_size": (1, 1 << 20), "max_seq_len": (1, 1 << 22),
}
MAX_HIDDEN_DIM = 1 << 18


def project(layer: nn.Module, x: torch.Tensor, adapters: Optional[torch.Tensor]) -> torch.Tensor:
    """layer(x), plus, where `adapters` (B,) names each row's adapter slot, that adapter's low-rank update
    (the layer is then a llama.adapters.AdaptedLinear)."""
    return layer(x) if adapters is None else layer(x, adapters)


def _check_positive_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number above 0: fix the checkpoint's params.json or "
                         "config.json")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 RoPE frequency scaling; the defaults are the published Llama 3.1 constants.
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Build from a `params.json` dict; keys this model does not use are named in a warning."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            log.warning("params.json keys not used by this model (ignored): %s", ", ".join(unknown))
        values = {k: v for k, v in params.items() if k in known}
        values.update(overrides)
        args = cls(**values)
        args.validate()
        return args

    def validate(self) -> None:
        """Refuse values no real model has (before anything is sized by them): each size within
        `LIMITS`, each float finite and positive, the heads dividing evenly."""
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if name == "vocab_size" and value == -1:  # Llama 1's params.json: the shards tell (MetaCheckpoint)
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                fix = ("pass a value in range" if name in ("max_batch_size", "max_seq_len")
                       else "fix the checkpoint's params.json or config.json")
                raise ValueError(f"{name}={value!r} must be an integer from {low} to {high} (the bounds on what a "
                                 f"real LLaMA model has): {fix}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}: fix params.json")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: fix params.json"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE: fix dim or n_heads")
        for name in ("rope_theta", "norm_eps", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            _check_positive_finite(name, getattr(self, name))
        if self.ffn_dim_multiplier is not None:
            _check_positive_finite("ffn_dim_multiplier", self.ffn_dim_multiplier)
        if self.norm_eps >= 1:
            raise ValueError(f"norm_eps={self.norm_eps!r} must be below 1 (real models use 1e-5 or 1e-6): "
                             "fix params.json")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"use_scaled_rope={self.use_scaled_rope!r} must be true or false: fix params.json")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor={self.rope_high_freq_factor!r} must exceed rope_low_freq_factor="
                             f"{self.rope_low_freq_factor!r} (Llama 3.1 uses 4 and 1): fix params.json")
        if self.hidden_dim > MAX_HIDDEN_DIM:
            raise ValueError(f"the feed-forward width {self.hidden_dim} (from dim, multiple_of and ffn_dim_multiplier) "
                             f"exceeds {MAX_HIDDEN_DIM}: fix the checkpoint's params.json or config.json")

    @property
    def rope_scaling(self) -> Optional[dict]:
        """Keyword arguments of `scale_rope_freqs`, or None without Llama 3.1 scaling."""
        if not self.use_scaled_rope:
            return None
        return dict(factor=self.rope_scale_factor, low_freq_factor=self.rope_low_freq_factor,
                    high_freq_factor=self.rope_high_freq_factor,
                    original_max_seq_len=self.rope_original_max_seq_len)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, scaled by ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class Linear(nn.Linear):
    """A bias-free nn.Linear whose weight starts empty, for a checkpoint to fill (no draw from the global RNG)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """An nn.Embedding whose weight starts empty, as Linear."""

    def reset_parameters(self) -> None:
        pass


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, dim: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; `eps` and `dim` are 0-dim tensors: an op
    with a Python number turns it into a tensor on every call, which costs more than the op itself at
    a small model's decode step."""
    float32 = x.dtype == torch.float32  # else reduce in float32: bf16/fp16 squares lose too much precision
    xf = x if float32 else x.float()
    normed = xf * torch.rsqrt(torch.addcdiv(eps, (xf * xf).sum(-1, keepdim=True), dim))  # mean(x^2) + eps
    return (normed if float32 else normed.type_as(x)) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.register_buffer("eps_tensor", None, persistent=False)  # set by setup_cache, on the model's device
        self.register_buffer("dim_tensor", None, persistent=False)

    def setup(self, device: torch.device) -> None:
        self.eps_tensor = torch.tensor(self.eps, device=device)
        self.dim_tensor = torch.tensor(float(self.weight.shape[0]), device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps_tensor, self.dim_tensor)


def scale_rope_freqs(freqs: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_seq_len: int) -> torch.Tensor:
    """Llama 3.1 long-context scaling: slow rotations (wavelength beyond the original context /
    low_freq_factor) are divided by `factor`, fast ones (below context / high_freq_factor) kept,
    and the band between blends the two linearly in context / wavelength."""
    wavelen = 2 * torch.pi / freqs
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)  # 0: long wavelength, fully scaled; 1: short, untouched
    return (1 - smooth) * freqs / factor + smooth * freqs


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0,
                         scaling: Optional[dict] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """RoPE rotations as (cos, sin) pairs: shape (end, head_dim // 2, 2), float32.

    `scaling` holds the keyword arguments of `scale_rope_freqs` (ModelArgs.rope_scaling).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is not None:
        freqs = scale_rope_freqs(freqs, **scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float32, device=device), freqs)  # (end, head_dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rope_table(freqs_cis: torch.Tensor) -> torch.Tensor:
    """(end, 2, D/2, 2): for each position, the factors (cos, cos) of every pair (x0, x1) and (-sin, sin) of
    its swap (x1, x0), by which `apply_rotary_emb_` multiplies them."""
    cos, sin = freqs_cis.unbind(-1)  # (end, D/2) each
    return torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)], 1)


def apply_rotary_emb_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x (B, T, H, D) in place, in float32, as Meta's
    checkpoints expect: (x0 cos - x1 sin, x1 cos + x0 sin). `cos` and `sin` (B, T, 1, D/2, 2) hold each
    token's rows of `rope_table`."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2): x itself in float32
    swapped = pairs.flip(-1)
    pairs.mul_(cos).addcmul_(swapped, sin)
    if x.dtype != torch.float32:
        x.copy_(pairs.flatten(-2))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of queries q (B, T, H, D) to keys and values (B, Hkv, S, D) under a mask (B, 1, T, S)
    added to the scores (0 or -inf). Returns (B, T, H * D).

    Grouped-query attention without copying keys and values per query head: the n_rep query heads
    that share a kv head fold into the query-length axis (query head h uses kv head h // n_rep).
    """
    B, T, H, D = q.shape
    Hkv = keys.shape[1]
    n_rep = H // Hkv
    if T == 1:  # decoding: the fold is a view, and the (B, 1, 1, S) mask broadcasts over it
        out = F.scaled_dot_product_attention(q.view(B, Hkv, n_rep, D), keys, values, attn_mask=mask)
        return out.reshape(B, 1, H * D)  # (B, Hkv, n_rep, D) -> (B, 1, H * D)
    q = q.view(B, T, Hkv, n_rep, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, n_rep * T, D)
    mask = mask.repeat(1, 1, n_rep, 1)  # (B, 1, n_rep * T, S): the fold repeats the queries n_rep times
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, Hkv, n_rep * T, D)
    return out.view(B, Hkv, n_rep, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


class Attention(nn.Module):
    fused = "wqkv"  # wq, wk and wv of the checkpoint, as one linear

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_local_heads = args.n_heads  # this rank's heads: llama.distributed.parallelize_ divides them
        self.n_local_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wqkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * self.head_dim)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim)
        self.register_buffer("cache", None, persistent=False)  # set by setup_cache()
        self.register_load_state_dict_pre_hook(_fuse_checkpoint_tensors)

    def parts(self) -> Dict[str, int]:
        """Local output rows of the checkpoint tensors fused in wqkv, in order."""
        q, kv = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
        return {"wq": q, "wk": kv, "wv": kv}

    def setup_cache(self, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        # (blocks, block_size, 2 * Hkv, D): a position's keys, then its values, side by side, so that a
        # step's keys and values are stored by one write and a block is read as one piece.
        shape = (num_blocks, block_size, 2 * self.n_local_kv_heads, self.head_dim)
        self.cache = torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor,
                block_table: torch.Tensor, adapters: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        heads = project(self.wqkv, x, adapters).view(B, T, H + 2 * Hkv, D)  # queries, keys, values of the local heads
        apply_rotary_emb_(heads[:, :, : H + Hkv], *rope)  # in place: the keys stay beside the values
        cache = self.cache
        # each token's keys and values into its slot: (B * T, 2 * Hkv, D) into (blocks * block_size, 2 * Hkv, D)
        cache.view(-1, 2 * Hkv, D).index_copy_(0, slots.reshape(-1), heads[:, :, H:].reshape(B * T, 2 * Hkv, D))
        kv = cache.index_select(0, block_table.reshape(-1)).view(B, -1, 2 * Hkv, D)  # (B, S, 2 * Hkv, D): each row's blocks in order
        keys, values = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)  # (B, Hkv, S, D) views
        return project(self.wo, attend(heads[:, :, :H], keys, values, mask), adapters)


class FeedForward(nn.Module):
    fused = "w13"  # w1 and w3 of the checkpoint, as one linear

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_local = hidden_dim  # this rank's share: llama.distributed.parallelize_ divides it
        self.w13 = Linear(dim, 2 * hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.register_load_state_dict_pre_hook(_fuse_checkpoint_tensors)

    def parts(self) -> Dict[str, int]:
        """Local output rows of the checkpoint tensors fused in w13, in order."""
        return {"w1": self.hidden_local, "w3": self.hidden_local}

    def forward(self, x: torch.Tensor, adapters: Optional[torch.Tensor] = None) -> torch.Tensor:
        gate, up = project(self.w13, x, adapters).chunk(2, dim=-1)
        return project(self.w2, F.silu(gate) * up, adapters)


def _fuse_checkpoint_tensors(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: Meta's separate wq/wk/wv (w1/w3) tensors, and int8 scales, become
    the fused module's."""
    for leaf in ("weight", "scales"):
        names = [f"{prefix}{part}.{leaf}" for part in module.parts()]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}{module.fused}.{leaf}"] = torch.cat([state_dict.pop(n) for n in names])


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, rope, mask, slots, block_table, adapters=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, slots, block_table, adapters)
        return h + self.feed_forward(self.ffn_norm(h), adapters)


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        params.validate()
        if params.vocab_size <= 0:
            raise ValueError(f"vocab_size={params.vocab_size}: set it from the tokenizer before building the model")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = Linear(params.dim, params.vocab_size)
        self.register_buffer("rope", None, persistent=False)  # set by setup_cache, with the KV cache
        self.register_buffer("key_positions", None, persistent=False)  # arange of the most keys a row reads
        self.block_size = 0  # set by setup_cache
        self.compiled: Optional[CompiledForward] = None  # set by compile_()

    def checkpoint_target(self, name: str) -> torch.Tensor:
        """The part of this model's tensors that this rank's slice of checkpoint tensor `name` fills:
        the tensor itself, or its rows of a fused wqkv / w13 (weight, int8 scales or int4 group scales
        and zeros: llama.quantize)."""
        module_path, _, leaf = name.rpartition(".")  # "layers.0.attention.wk", "weight"
        block_path, _, part = module_path.rpartition(".")  # "layers.0.attention", "wk"
        block = self.get_submodule(block_path) if block_path else self
        if isinstance(block, (Attention, FeedForward)) and part in block.parts():
            sizes = block.parts()
            start = sum(sizes[p] for p in list(sizes)[: list(sizes).index(part)])
            return getattr(getattr(block, block.fused), leaf)[start : start + sizes[part]]
        return getattr(self.get_submodule(module_path), leaf)

    def compile_(self) -> "Transformer":
        """Compile `forward` for decode steps (prefill stays eager): the engine calls it with a fixed
        number of rows and of blocks per bucket (see CompiledForward), so it compiles once per bucket."""
        # Every call reads the same modules: checking their guards would cost more than a small
        # model's whole step, so they are skipped (compile again after replacing a weight).
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.tok_embeddings.weight.device.type == "cpu":
            # A C++ wrapper calls the step's kernels: the Python one costs about as much as they do
            # at a small model's step.
            options["cpp_wrapper"] = True
        else:
            # CUDA graphs replay the step's kernels in one launch: a decode step is otherwise bound by
            # launching them one by one.
            options["triton.cudagraphs"] = True
        self.compiled = CompiledForward(self, options)
        return self

    def setup_cache(self, num_blocks: Optional[int] = None, block_size: int = BLOCK_SIZE,
                    max_seq_len: Optional[int] = None, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> None:
        """Allocate every layer's KV cache, `num_blocks` blocks of `block_size` positions (block 0 being
        the padding block; default: enough for params.max_batch_size sequences of max_seq_len), and the
        RoPE table for max_seq_len positions (default: params.max_seq_len)."""
        p = self.params
        max_seq_len = max_seq_len or p.max_seq_len
        check_positive_int("block_size", block_size)
        num_blocks = num_blocks or 1 + p.max_batch_size * -(-max_seq_len // block_size)
        check_positive_int("num_blocks", num_blocks)
        weight = self.tok_embeddings.weight
        device = device or weight.device
        self.rope = rope_table(precompute_freqs_cis(p.head_dim, max_seq_len, p.rope_theta, p.rope_scaling, device))
        self.key_positions = torch.arange(-(-max_seq_len // block_size) * block_size, device=device)
        self.block_size = block_size
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.setup(device)
        for layer in self.layers:
            layer.attention.setup_cache(num_blocks, block_size, device, dtype or weight.dtype)

    def layout(self, batch: int, start: int, length: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions (B, T), cache slots (B, T) and block tables (B, W) for `batch` sequences of
        `length` tokens from position `start`, row b in blocks of its own (1 + b * n, ... for n blocks
        of max_seq_len): for calling the model directly, as tests and research code do; the engine
        plans its own."""
        n = self.key_positions.numel() // self.block_size
        if (1 + batch * n) > self.layers[0].attention.cache.shape[0] or start + length > self.rope.shape[0]:
            raise ValueError(f"{batch} rows of positions {start}..{start + length - 1} do not fit the KV cache")
        device = self.key_positions.device
        positions = torch.arange(start, start + length, device=device).expand(batch, length)
        block_table = 1 + torch.arange(batch * n, device=device).view(batch, n)
        slots = block_table.gather(1, positions // self.block_size) * self.block_size + positions % self.block_size
        width = -(-(start + length) // self.block_size)
        return positions, slots, block_table[:, :width]

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               block_table: torch.Tensor, adapters: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for `tokens` (B, T) at `positions` (B, T), whose keys and
        values go to cache `slots` (B, T). A token attends to its row's keys at positions up to its own,
        read through `block_table` (B, W): W blocks cover the furthest position of the row. `adapters`
        (B,): each row's adapter slot, 0 for none (llama.adapters); None: no row has one."""
        S = block_table.shape[1] * self.block_size
        rope = self.rope[positions].unsqueeze(2).unbind(3)  # cos and sin factors, (B, T, 1, D/2, 2) each
        visible = self.key_positions[:S] <= positions[..., None]  # (B, T, S): causal, by position
        h = project(self.tok_embeddings, tokens, adapters)  # (B, T, dim)
        # added to the scores: made once here, where a boolean mask would be converted in every layer
        mask = torch.zeros(visible.shape, dtype=h.dtype, device=h.device).masked_fill_(~visible, float("-inf"))
        mask = mask.unsqueeze(1)  # (B, 1, T, S)
        for layer in self.layers:
            h = layer(h, rope, mask, slots, block_table, adapters)
        return self.norm(h)

    def logits(self, h: torch.Tensor, adapters: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 logits (..., vocab_size) for final-norm hidden states (..., dim) (and, with `adapters`,
        each row's adapter slot: (N,) for h (N, dim), (B,) for h (B, T, dim))."""
        return project(self.output, h, adapters).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                block_table: torch.Tensor, adapters: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 logits (B, T, vocab_size) for every position of `tokens`; see `hidden`. Runs under
        inference mode: the result takes no part in autograd."""
        return self.logits(self.hidden(tokens, positions, slots, block_table, adapters), adapters)


class CompiledForward:
    """`Transformer.forward` compiled, one copy of its code per block-table width (and per whether rows
    have adapters).

    Dynamo keeps compiled graphs per code object, and recompiles one only so many times (its
    recompile_limit, 8 by default): a copy per width leaves each copy just the row buckets to hold.
    Each model gets copies of its own too: without module guards, two models (another dtype,
    another cache size) would otherwise share a graph.
    """

    def __init__(self, model: Transformer, options: Dict[str, object]):
        self.model, self.options = model, options
        self.by_width: Dict[Tuple[int, bool], object] = {}

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_table: torch.Tensor, adapters: Optional[torch.Tensor] = None) -> torch.Tensor:
        width = (block_table.shape[1], adapters is not None)
        forward = self.by_width.get(width)
        if forward is None:
            code = Transformer.forward.__wrapped__.__code__.replace()  # the function inside inference_mode
            method = types.MethodType(types.FunctionType(code, globals(), "forward"), self.model)
            forward = torch.compile(method, fullgraph=True, dynamic=False, options=dict(self.options))
            self.by_width[width] = forward
        return forward(tokens, positions, slots, block_table, adapters)
