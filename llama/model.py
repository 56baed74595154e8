"""The LLaMA transformer on fairscale's model-parallel layers.

Parameter names and shapes follow Meta's `consolidated.NN.pth` checkpoints, so a
rank's shard loads with a single `load_state_dict`.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, fields
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn

from llama.errors import check_positive_int
from llama.quantize import int8_linear, quantize_model_, weight_bytes

log = logging.getLogger(__name__)

# Plain CPU loads of models up to this size fuse wqkv and w13 (see Transformer.optimize_).
_FUSE_ON_CPU_BYTES = 256 * 2**20


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
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            check_positive_int(name, getattr(self, name))
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}: fix params.json")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: fix params.json"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE: fix dim or n_heads")

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


def _keep(w: torch.Tensor) -> torch.Tensor:
    # Weights come from a checkpoint; skip fairscale's random init.
    return w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, dim: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; `eps` and `dim` are 0-dim tensors: an op
    with a Python number turns it into a tensor on every call, which costs more than the op itself at
    a small model's decode step."""
    float32 = x.dtype == torch.float32  # else reduce in float32: bf16/fp16 squares lose too much precision
    xf = x if float32 else x.float()  # (even a no-op cast is a call, which counts here)
    normed = xf * torch.rsqrt(torch.addcdiv(eps, (xf * xf).sum(-1, keepdim=True), dim))  # mean(x^2) + eps
    return (normed if float32 else normed.type_as(x)) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("eps_tensor", torch.tensor(eps), persistent=False)
        self.register_buffer("dim_tensor", torch.tensor(float(dim)), persistent=False)

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
                         scaling: Optional[dict] = None) -> torch.Tensor:
    """RoPE rotations as (cos, sin) pairs: shape (end, head_dim // 2, 2), float32.

    Stored as real numbers, not complex, so the table survives dtype casts and torch.compile.
    `scaling` holds the keyword arguments of `scale_rope_freqs` (ModelArgs.rope_scaling).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        freqs = scale_rope_freqs(freqs, **scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)  # (end, head_dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as Meta's checkpoints expect, in float32.

    x: (B, T, H, D); freqs_cis: the rotations from `rotations`, (B or 1, T, 1, D/2) complex, or
    under torch.compile their (cos, sin) pairs (B or 1, T, 1, D/2, 2).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    if freqs_cis.is_complex():  # eager: one complex multiply instead of six real kernels
        return torch.view_as_real(torch.view_as_complex(pairs) * freqs_cis).flatten(-2).type_as(x)
    cos, sin = freqs_cis.unbind(-1)  # (B or 1, T, 1, D/2) each
    x0, x1 = pairs.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)


def apply_rotary_emb_(x: torch.Tensor, freqs_cis: torch.Tensor) -> None:
    """`apply_rotary_emb` in place."""
    if x.dtype == torch.float32 and freqs_cis.is_complex():  # multiply x's complex view: no copies
        torch.view_as_complex(x.view(x.shape[:-1] + (-1, 2))).mul_(freqs_cis)  # (B, T, H, D/2) complex
    else:
        x.copy_(apply_rotary_emb(x, freqs_cis))


def rotations(freqs_cis: torch.Tensor) -> torch.Tensor:
    """What `apply_rotary_emb` takes for rows of the RoPE table: (B or 1, T, D/2, 2) -> (B or 1, T, 1, D/2),
    complex in eager (made once per forward, not per layer), real (cos, sin) pairs under torch.compile,
    whose inductor generates no code for complex numbers."""
    if torch.compiler.is_compiling():
        return freqs_cis.unsqueeze(2)
    return torch.view_as_complex(freqs_cis.float()).unsqueeze(2)


def _model_parallel_size() -> int:
    return fs_init.get_model_parallel_world_size()


def dense(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ weight.T for a float weight, or an int8 one with per-output-channel `scales` (llama.quantize)."""
    return F.linear(x, weight) if scales is None else int8_linear(x, weight, scales)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of queries q (B, T, H, D) to keys and values (B, Hkv, S, D): (B, T, H * D).

    Grouped-query attention without copying the cache: the n_rep query heads that share a kv head
    fold into the query-length axis (query head h uses kv head h // n_rep), so `mask` is
    (B or 1, 1, n_rep * T, S), or (B or 1, 1, 1, S) for one query.
    """
    B, T, H, D = q.shape
    Hkv = keys.shape[1]
    n_rep = H // Hkv
    if T == 1:  # decoding: the folds are plain views
        q = q.view(B, Hkv, n_rep, D)
    else:
        q = q.view(B, T, Hkv, n_rep, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, n_rep * T, D)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, Hkv, n_rep * T, D)
    if T == 1:
        return out.reshape(B, 1, H * D)
    return out.view(B, Hkv, n_rep, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


def linear(layer: nn.Module, x: torch.Tensor, split: bool) -> torch.Tensor:
    """What `layer(x)` computes for a fairscale column/row-parallel linear, for inference.

    fairscale wraps every call in autograd Functions that only matter for training; at
    model-parallel size 1 (`split` False) they are pure per-call overhead, so this is a bare
    matmul. Split layers keep their all-reduce / all-gather. int8 layers (llama.quantize) carry
    per-output-channel `scales`.
    """
    y = dense(x, layer.weight, layer._buffers.get("scales"))  # getattr(layer, "scales", None) would raise, slowly
    if not split:
        return y
    if isinstance(layer, RowParallelLinear):
        return reduce_from_model_parallel_region(y)
    return gather_from_model_parallel_region(y) if layer.gather_output else y


def _fuse_columns(*layers: ColumnParallelLinear) -> ColumnParallelLinear:
    """One column-parallel linear whose output is the layers' outputs side by side.

    Each rank concatenates its own slices, so rank r's fused output is [a_r, b_r, ...]: the
    caller splits it with the local sizes, at any model-parallel size.
    """
    weight = torch.cat([layer.weight for layer in layers])  # (sum of local outs, in)
    mp = _model_parallel_size()
    fused = ColumnParallelLinear(layers[0].in_features, weight.shape[0] * mp, bias=False, gather_output=False,
                                 init_method=_keep)
    if weight.dtype == torch.int8:  # llama.quantize layout: int8 buffer plus per-row scales
        del fused.weight
        fused.register_buffer("weight", weight)
        fused.register_buffer("scales", torch.cat([layer.scales for layer in layers]))
    else:
        fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = _model_parallel_size()
        if args.n_heads % mp or args.n_kv_heads % mp:
            raise ValueError(
                f"n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads} must both be divisible by the "
                f"model-parallel size {mp}: run with fewer processes"
            )
        self.split = mp > 1
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.n_kv_heads // mp
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.wqkv: Optional[ColumnParallelLinear] = None  # set by fuse_()
        self.register_buffer("cache", None, persistent=False)  # set by setup_cache()

    def fuse_(self) -> None:
        """Replace wq, wk, wv by one wqkv: one matmul instead of three per step."""
        if self.wqkv is None:
            self.wqkv = _fuse_columns(self.wq, self.wk, self.wv)
            del self.wq, self.wk, self.wv

    def setup_cache(self, max_batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> None:
        # (B, 2 * Hkv, S, D): the keys' heads, then the values'. Head-major, so attention reads keys
        # and values as plain slices; together, so a step's keys and values are stored by one write.
        shape = (max_batch_size, 2 * self.n_local_kv_heads, max_seq_len, self.head_dim)
        # An inference tensor, written only under inference mode (Transformer.hidden): its slices cost less.
        with torch.inference_mode():
            self.cache = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def cache_k(self) -> Optional[torch.Tensor]:
        """The cached keys as (B, S, Hkv, D), a view (None before setup_cache)."""
        return None if self.cache is None else self.cache[:, : self.n_local_kv_heads].transpose(1, 2)

    @property
    def cache_v(self) -> Optional[torch.Tensor]:
        """The cached values as (B, S, Hkv, D), a view (None before setup_cache)."""
        return None if self.cache is None else self.cache[:, self.n_local_kv_heads :].transpose(1, 2)

    def qkv(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, T, H, D) and keys then values (B, T, 2 * Hkv, D) of local heads, RoPE applied."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        wqkv = self.wqkv
        if wqkv is None:  # the reference layout, as stored in checkpoints
            q = linear(self.wq, x, self.split).view(B, T, H, D)
            k = linear(self.wk, x, self.split).view(B, T, Hkv, D)
            v = linear(self.wv, x, self.split).view(B, T, Hkv, D)
            return apply_rotary_emb(q, freqs_cis), torch.cat([apply_rotary_emb(k, freqs_cis), v], dim=2)
        heads = linear(wqkv, x, self.split).view(B, T, H + 2 * Hkv, D)  # queries, keys, values
        apply_rotary_emb_(heads[:, :, : H + Hkv], freqs_cis)  # in place: the keys stay beside the values
        return heads[:, :, :H], heads[:, :, H:]

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        positions: Union[int, Tuple[torch.Tensor, torch.Tensor]],
        mask: Optional[torch.Tensor],
        kv_len: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, kv = self.qkv(x, freqs_cis)
        cache = self.cache
        if isinstance(positions, int):
            cache[:B, :, positions : positions + T] = kv.transpose(1, 2)
        else:  # (rows (B, 1), positions (B, T)): each sequence at its own positions
            rows, positions = positions
            cache[rows, :, positions] = kv  # the indexed slots, (B, T, 2 * Hkv, D), take kv as it is
        keys = cache[:B, : self.n_local_kv_heads, :kv_len]  # (B, Hkv, S, D), a view
        values = cache[:B, self.n_local_kv_heads :, :kv_len]
        return linear(self.wo, attend(q, keys, values, mask), self.split)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.split = _model_parallel_size() > 1
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_keep)
        self.w13: Optional[ColumnParallelLinear] = None  # set by fuse_()

    def fuse_(self) -> None:
        """Replace w1, w3 by one w13: one matmul instead of two per step."""
        if self.w13 is None:
            self.w13 = _fuse_columns(self.w1, self.w3)
            del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w13 = self.w13
        if w13 is None:  # the reference layout, as stored in checkpoints
            gate, up = linear(self.w1, x, self.split), linear(self.w3, x, self.split)
        else:
            gate, up = linear(w13, x, self.split).chunk(2, dim=-1)
        return linear(self.w2, F.silu(gate) * up, self.split)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, positions, mask, kv_len) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, positions, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        params.validate()
        if params.vocab_size <= 0:
            raise ValueError(f"vocab_size={params.vocab_size}: set it from the tokenizer before building the model")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.split = _model_parallel_size() > 1
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_keep)
        freqs = precompute_freqs_cis(params.head_dim, params.max_seq_len, params.rope_theta, params.rope_scaling)
        self.register_buffer("freqs_cis", freqs, persistent=False)
        self.register_buffer("seq_index", None, persistent=False)  # arange(max_seq_len), for masks
        self.register_buffer("batch_index", None, persistent=False)  # arange(max_batch_size), for cache writes
        self.compiled_step = None  # set by compile_decode_()

    def fuse_(self) -> "Transformer":
        """Fuse wq/wk/wv and w1/w3 of every layer (after loading: checkpoints keep the separate names)."""
        for layer in self.layers:
            layer.attention.fuse_()
            layer.feed_forward.fuse_()
        return self

    def optimize_(self, quantize: Optional[str] = None, compile: bool = False) -> "Transformer":
        """Ready a loaded model for fast inference: quantize, fuse, compile, as asked and where it pays."""
        if quantize is not None:
            quantize_model_(self)
        # Fusing copies 2/3 of the weights. On a GPU the caching allocator reuses what the parts
        # free; on CPU the C allocator keeps most of it (measured: resident memory 1.41x the bf16
        # weights of a 1.1B model instead of 1.01x) to save a few microseconds a step, so plain CPU
        # loads stay unfused, unless torch.compile, which exists to cut per-call overhead, is asked for,
        # or the model is so small that those microseconds are most of its step and the copy is cheap.
        small = weight_bytes(self) <= _FUSE_ON_CPU_BYTES
        if compile or quantize is not None or small or self.tok_embeddings.weight.device.type != "cpu":
            self.fuse_()
        if compile:
            self.compile_decode_()
        return self

    def compile_decode_(self) -> "Transformer":
        """Compile the one-token decode step (`hidden` with (B, 1) tokens and (B,) positions).

        The compiled step attends to the whole cache under a mask instead of the first `kv_len`
        keys, so every step has the same shapes and it compiles once per batch size.
        """
        # Every call reads the same modules: checking their guards would cost more than a small
        # model's whole step, so they are skipped (compile again after replacing a weight).
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.tok_embeddings.weight.device.type == "cpu":
            # A C++ wrapper calls the step's kernels: the Python one costs about as much as they do
            # at a small model's step (stories260K: 1.4x the tokens per second).
            options["cpp_wrapper"] = True
        else:
            # CUDA graphs replay the step's kernels in one launch: a decode step is otherwise
            # bound by launching them one by one (measured 3x faster at 1.1B on an H100).
            options["triton.cudagraphs"] = True
        # Dynamo keeps compiled graphs per code object, and without module guards two models
        # (another dtype, another cache size) would share one: give each model its own copy.
        code = Transformer._decode_step.__code__.replace()
        step = types.MethodType(types.FunctionType(code, globals(), "_decode_step"), self)
        self.compiled_step = torch.compile(step, fullgraph=True, dynamic=False, options=options)
        return self

    def setup_cache(
        self,
        max_batch_size: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Allocate every layer's KV cache for max_batch_size rows of max_seq_len positions."""
        weight = self.tok_embeddings.weight
        max_batch_size = max_batch_size or self.params.max_batch_size
        max_seq_len = max_seq_len or self.params.max_seq_len
        if max_seq_len > self.freqs_cis.shape[0]:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {self.freqs_cis.shape[0]}")
        device = device or weight.device
        for layer in self.layers:
            layer.attention.setup_cache(max_batch_size, max_seq_len, device, dtype or weight.dtype)
        self.seq_index = torch.arange(max_seq_len, device=device)
        self.batch_index = torch.arange(max_batch_size, device=device)

    @property
    def cache_shape(self) -> Optional[Tuple[int, int]]:
        """(max_batch_size, max_seq_len) of the KV cache, or None before setup_cache."""
        cache = self.layers[0].attention.cache  # (B, 2 * Hkv, S, D)
        return None if cache is None else (cache.shape[0], cache.shape[2])

    @torch.inference_mode()
    def hidden(
        self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0, kv_len: Optional[int] = None
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for `tokens` (B, T), filling the KV cache.

        Runs under torch.inference_mode (the cache is an inference tensor): the result takes no part
        in autograd, and a layer called on its own must be called under inference mode too.

        `start_pos` is the position of tokens[:, 0]: an int shared by every row, or a (B,) tensor
        of per-row positions (rows of a batch may then sit at different positions). With per-row
        positions, `kv_len` bounds the keys attended to (default: the whole cache).
        """
        B, T = tokens.shape
        if self.cache_shape is None:
            self.setup_cache()
        max_batch, max_seq = self.cache_shape
        if B > max_batch:
            raise ValueError(f"batch of {B} exceeds the cache's max_batch_size={max_batch}")
        if isinstance(start_pos, int):
            if start_pos < 0 or start_pos + T > max_seq:
                raise ValueError(f"positions {start_pos}..{start_pos + T - 1} fall outside max_seq_len={max_seq}")
            if T == 1 and self.compiled_step is not None:
                return self.compiled_step(tokens, torch.full((B,), start_pos, device=tokens.device))
            kv_len = start_pos + T
            freqs_cis = rotations(self.freqs_cis[start_pos : start_pos + T].unsqueeze(0))  # (1, T, 1, D/2)
            mask = None
            if T > 1:  # causal, offset by start_pos: query t sees keys 0..start_pos+t
                query_pos = self.seq_index[start_pos : start_pos + T]
                mask = (self.seq_index[:kv_len] <= query_pos[:, None])[None, None]  # (1, 1, T, S)
            return self._run(tokens, freqs_cis, start_pos, mask, kv_len)
        if T == 1 and self.compiled_step is not None:
            return self.compiled_step(tokens, start_pos)
        return self._run_at(tokens, start_pos, kv_len or max_seq)

    def _decode_step(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        return self._run_at(tokens, start_pos, self.cache_shape[1])

    def _run_at(self, tokens: torch.Tensor, start_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """`hidden` for per-row positions: tokens (B, T) start at start_pos (B,)."""
        B, T = tokens.shape
        positions = start_pos.to(tokens.device).view(B, 1) + self.seq_index[:T]  # (B, T)
        freqs_cis = rotations(self.freqs_cis[positions])  # (B, T, 1, D/2)
        mask = (self.seq_index[:kv_len] <= positions[..., None]).unsqueeze(1)  # (B, 1, T, S)
        return self._run(tokens, freqs_cis, (self.batch_index[:B, None], positions), mask, kv_len)

    def _run(self, tokens, freqs_cis, positions, mask, kv_len) -> torch.Tensor:
        if mask is not None and tokens.shape[1] > 1:
            # attention folds n_rep query heads into the query axis: (., 1, n_rep*T, S); one query broadcasts
            mask = mask.repeat(1, 1, self.layers[0].attention.n_rep, 1)
        h = F.embedding(tokens, self.tok_embeddings.weight)  # (B, T, dim): the local slice of dim
        if self.split:
            h = gather_from_model_parallel_region(h)
        for layer in self.layers:
            h = layer(h, freqs_cis, positions, mask, kv_len)
        return self.norm(h)

    def decode_step(self) -> Optional["DecodeStep"]:
        """`hidden` for one new token per row at a shared int position, bound to this model's tensors as
        they are now (so build one per generation), or None where it does not apply: model parallel,
        unfused weights, or a compiled step. The same operations, so the same numbers, without the
        module calls and parameter lookups, which were a third of stories260K's eager step."""
        fused = self.layers[0].attention.wqkv is not None and self.layers[0].feed_forward.w13 is not None
        if self.split or self.compiled_step is not None or not fused:
            return None
        if self.cache_shape is None:
            self.setup_cache()
        return DecodeStep(self)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(self.output, h, self.split).float()

    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0) -> torch.Tensor:
        """Float32 logits (B, T, vocab_size) for every position of `tokens`."""
        return self.logits(self.hidden(tokens, start_pos))


def _project(x: torch.Tensor, weight) -> torch.Tensor:
    """x (N, in) @ W.T, where `weight` is W.T (a view) for a float layer, or (int8 W, scales)."""
    return torch.mm(x, weight) if isinstance(weight, torch.Tensor) else int8_linear(x, *weight)


class DecodeStep:
    """See `Transformer.decode_step`: the modules' arithmetic for one token per row, on tensors looked
    up once. Activations are (B, features) and float weights are held transposed, so a projection is
    the one torch.mm that F.linear on (B, 1, features) comes down to."""

    def __init__(self, model: Transformer):
        def weight(layer: nn.Module):
            scales = layer._buffers.get("scales")
            return layer.weight.t() if scales is None else (layer.weight, scales)

        def norm(module: RMSNorm) -> tuple:
            return module.weight, module.eps_tensor, module.dim_tensor

        self.max_batch, self.max_seq = model.cache_shape
        self.embedding, self.freqs_cis, self.norm = model.tok_embeddings.weight, model.freqs_cis, norm(model.norm)
        self.layers = []
        for layer in model.layers:
            attention, ffn = layer.attention, layer.feed_forward
            heads = (attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim)
            self.layers.append((norm(layer.attention_norm), weight(attention.wqkv), attention.cache, heads,
                                weight(attention.wo), norm(layer.ffn_norm), weight(ffn.w13), weight(ffn.w2)))

    @torch.inference_mode()  # as `hidden`: the cache is an inference tensor
    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Final-norm hidden states (B, 1, dim) for `tokens` (B, 1) at position `pos`, filling the KV cache."""
        B = tokens.shape[0]
        if B > self.max_batch or not 0 <= pos < self.max_seq:
            raise ValueError(f"{B} rows at position {pos} do not fit the cache ({self.max_batch}, {self.max_seq})")
        freqs_cis = rotations(self.freqs_cis[pos : pos + 1].unsqueeze(0))  # (1, 1, 1, D/2)
        x = F.embedding(tokens.view(B), self.embedding)  # (B, dim): no length axis in this step
        for attention_norm, wqkv, cache, (H, Hkv, D), wo, ffn_norm, w13, w2 in self.layers:
            # Attention.forward
            heads = _project(rms_norm(x, *attention_norm), wqkv).view(B, 1, H + 2 * Hkv, D)  # q, k, v heads
            apply_rotary_emb_(heads[:, :, : H + Hkv], freqs_cis)
            cache[:B, :, pos] = heads[:, 0, H:]  # (B, 2 * Hkv, D)
            q = heads[:, 0, :H].view(B, Hkv, H // Hkv, D)  # attend()'s fold of query heads for one query
            out = F.scaled_dot_product_attention(q, cache[:B, :Hkv, : pos + 1], cache[:B, Hkv:, : pos + 1])
            h = x + _project(out.reshape(B, H * D), wo)  # (B, Hkv, n_rep, D) -> (B, H * D)
            # FeedForward.forward
            gate, up = _project(rms_norm(h, *ffn_norm), w13).chunk(2, dim=-1)
            x = h + _project(F.silu(gate) * up, w2)
        return rms_norm(x, *self.norm).unsqueeze(1)
