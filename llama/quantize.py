"""Weight-only quantization in plain PyTorch: int8 per output channel, int4 per group of inputs.

int8: each linear weight (out, in) becomes int8 values plus one scale per output channel:
w ≈ q * scale[:, None], scale = max|w[row]| / 127.

int4: each run of `group_size` input features of a row (a group) gets its own scale and zero,
asymmetric, with q in 0..15: w ≈ (q - 8) * scale + zero, scale = (max - min) / 15, zero =
min + 8 * scale (the form torch's int4 kernels take). A layer whose in-features no supported group
size divides stays int8.

Activations stay in the model's dtype. The token embedding stays as it is (a decode step reads
one of its rows, not all of it).

Under model parallelism a row-parallel weight (wo, w2) is split along its input dim, so a
rank holds part of every row. int8: the scale is the maximum over all ranks' parts, which makes
the quantized model the same whatever the number of shards. int4: groups never straddle ranks,
so each rank quantizes its own whole groups. A column-parallel weight's rows (and so its scales
and zeros) are split like the weight itself.

Checkpoints from scripts/quantize.py hold a portable layout, which reshards like any checkpoint:
int8 `NAME.weight` (out, in) int8 and `NAME.scales` (out,) float32; int4 `NAME.weight` (out, in/2)
uint8, two values a byte, the even input feature in the high nibble, and `NAME.group_scales`,
`NAME.group_zeros` (out, in/group_size) float32. This module alone turns it into what the
device's kernel takes (`pack_int4_`).

Packed linears (`pack_linears_`, after loading, on CPU): a batch-1 decode step reads every weight
once, so its speed is the rate at which a kernel streams weights. fbgemm, which x86 builds of torch
carry behind torch.ops.quantized, streams them faster than the plain paths do on CPUs without bf16
or int8 dot-product instructions of their own. Its weights are laid out once, at load, a block of
rows at a time, each block replacing its part of the weight as it goes:
- bf16 weights as fp16 (`linear_dynamic_fp16`: float32 activations and sums). Every bf16 value in
  fp16's normal range (6.1e-5 to 65504) is an fp16 value too; smaller ones are rounded to fp16's
  subnormal step, 2^-24. A layer with a value past 65504 stays as it is.
- int8 weights with integer dot products (`linear_dynamic`): fbgemm quantizes a whole activation
  tensor with one 7-bit scale and zero point (8 bits could overflow its 16-bit pair sums), so each
  row is first divided by its own max |x| (under model parallelism, over every rank's part of the
  row) and the result multiplied back, and a row that spans [-1, 1] fixes that scale: a row's
  result depends on that row alone, not on the batch around it or on the number of ranks.
Each kind is checked once per process against the plain path on a small layer, as the int4 kernels
are; where fbgemm is missing or disagrees, the plain layers stay.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import mmap
import re
import sys
import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from llama.errors import CheckpointError

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels take
DEFAULT_GROUP_SIZE = 128
_SCALES = ".scales"  # suffix of a weight's scales in a quantized state dict: "....wq.scales"
INT4_LEAVES = ("group_scales", "group_zeros")  # an int4 weight's companions: checkpoint names, Int4Linear views

# Checkpoint linear name ("layers.0.attention.wq") -> its int4 group size, or None for int8.
Layout = Dict[str, Optional[int]]


def check_mode(mode: Optional[str], group_size: Optional[int] = None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported: use one of {MODES} or None")
    if group_size is None:
        return
    if mode != "int4":
        raise ValueError(f"group_size={group_size!r} applies to quantize='int4' only (quantize={mode!r})")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not supported by the int4 kernels: use one of "
                         f"{GROUP_SIZES}, or leave it unset for {DEFAULT_GROUP_SIZE} (or the largest that "
                         "divides a layer's in-features)")


def int4_group_size(in_features: int, group_size: Optional[int] = None) -> Optional[int]:
    """The group size an int4 layer with `in_features` (this rank's) gets, or None if it must stay int8:
    `group_size` if it divides them; unset, the largest supported size up to DEFAULT_GROUP_SIZE that does."""
    if group_size is not None:
        return group_size if in_features % group_size == 0 else None
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if g <= DEFAULT_GROUP_SIZE and in_features % g == 0),
                None)


def plan(mode: str, inputs: Dict[str, Tuple[int, int]], group_size: Optional[int] = None) -> Layout:
    """The layout quantizing in `mode` gives each linear; `inputs` maps each checkpoint linear name to
    (in-features, the number of ranks or shards they are split over: 1 unless row-parallel).

    A layer that no group size fits stays int8, and the log says which. An explicit `group_size` that
    divides a row-parallel layer's in-features but not each rank's part would straddle ranks: refused.
    """
    check_mode(mode, group_size)
    if mode == "int8":
        return {name: None for name in inputs}
    layout: Layout = {}
    for name, (in_features, parts) in inputs.items():
        layout[name] = int4_group_size(in_features // parts, group_size)
        if layout[name] is None and group_size is not None and in_features % group_size == 0:
            raise ValueError(f"int4 groups of {group_size} would straddle ranks in {name}: its {in_features} "
                             f"in-features are split over {parts} shards or processes ({in_features // parts} "
                             f"each): use a group size that divides {in_features // parts}, or fewer processes")
    auto = ", ".join(str(g) for g in GROUP_SIZES if g <= DEFAULT_GROUP_SIZE)
    why = f"group size {group_size} does not divide them" if group_size else f"none of {auto} divides them"
    for pattern, (in_features, count) in _fallbacks(layout, inputs).items():
        log.info("int4: %s (%d layer(s), %d in-features) fall back to int8: %s", pattern, count, in_features, why)
    return layout


def _fallbacks(layout: Layout, inputs: Dict[str, Tuple[int, int]]) -> Dict[str, Tuple[int, int]]:
    """Int8 layers of an int4 layout, grouped by name with the layer number as '*': (in-features, count)."""
    out: Dict[str, Tuple[int, int]] = {}
    for name, g in layout.items():
        if g is None:
            pattern = re.sub(r"^layers\.\d+\.", "layers.*.", name)
            in_features = inputs[name][0] // inputs[name][1]
            out[pattern] = (in_features, out.get(pattern, (0, 0))[1] + 1)
    return out


def describe(layout: Optional[Layout]) -> str:
    """'int8', 'int4 (group size 64; 5 layer(s) int8)' and the like, for logs."""
    if not layout:
        return "float"
    sizes = sorted({g for g in layout.values() if g is not None})
    if not sizes:
        return "int8"
    n_int8 = sum(g is None for g in layout.values())
    return f"int4 (group size {'/'.join(map(str, sizes))}" + (f"; {n_int8} layer(s) int8)" if n_int8 else ")")


def quantized_shapes(name: str, out_features: int, in_features: int,
                     group_size: Optional[int]) -> Dict[str, Tuple[int, ...]]:
    """The checkpoint tensors that replace float weight `name`.weight, with their whole shapes."""
    if group_size is None:
        return {f"{name}.weight": (out_features, in_features), f"{name}{_SCALES}": (out_features,)}
    groups = (out_features, in_features // group_size)
    return {f"{name}.weight": (out_features, in_features // 2), **{f"{name}.{leaf}": groups for leaf in INT4_LEAVES}}


def read_layout(tensors: Dict[str, torch.Tensor], linears: List[str]) -> Optional[Layout]:
    """The layout of a checkpoint shard holding `tensors`, for its `linears` (checkpoint names), or None
    for a float checkpoint. The group size follows from one shard's own shapes: 2 * (in/2) / groups.
    Shapes are checked against the whole model afterwards; this refuses dtypes and sizes no kernel takes."""
    if not any(k.endswith((_SCALES, f".{INT4_LEAVES[0]}")) for k in tensors):
        return None
    layout: Layout = {}
    for name in linears:
        weight, scales = tensors.get(f"{name}.weight"), tensors.get(f"{name}.{INT4_LEAVES[0]}")
        if scales is None:
            layout[name] = None
            if weight is not None and weight.dtype != torch.int8:
                raise CheckpointError(f"{name}.weight is {weight.dtype}, but an int8 layer's weight is torch.int8: "
                                      "quantize the float checkpoint again with scripts/quantize.py")
            continue
        if weight is None or weight.dim() != 2 or scales.dim() != 2 or weight.dtype != torch.uint8:
            raise CheckpointError(f"{name} has {INT4_LEAVES[0]} but its weight is not (out, in/2) torch.uint8 as an "
                                  "int4 layer's is: quantize the float checkpoint again with scripts/quantize.py")
        size = 2 * weight.shape[1] // max(scales.shape[1], 1)
        if size not in GROUP_SIZES or size * scales.shape[1] != 2 * weight.shape[1]:
            raise CheckpointError(f"{name}: a weight of shape {tuple(weight.shape)} (two int4 values a byte) and "
                                  f"{INT4_LEAVES[0]} of shape {tuple(scales.shape)} give no supported group size "
                                  f"{GROUP_SIZES}: quantize the float checkpoint again with scripts/quantize.py")
        layout[name] = size
    return layout


# int8.

def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T for int8 `weight` (out, in) and `scales` in x's dtype."""
    # On CPU a kernel that converts the int8 weight on the fly; in torch 2.13 it crashes (SIGSEGV) on
    # bf16 activations of several rows when the in-features are not a multiple of 16.
    if x.device.type == "cpu" and (x.dtype != torch.bfloat16 or weight.shape[1] % 16 == 0):
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)
        return out.view(*x.shape[:-1], weight.shape[0])  # (..., out)
    # Elsewhere a cast and a scale: simple, but it makes a float copy of the weight per call, which
    # costs a GPU step about what the int8 weights save (README, Performance).
    return F.linear(x, weight.to(x.dtype)) * scales


def _combined(y: torch.Tensor, combine: Optional[str]) -> torch.Tensor:
    if combine == "gather":
        return gather_from_model_parallel_region(y)
    return reduce_from_model_parallel_region(y) if combine == "reduce" else y


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (out, in) and per-output-channel scales, as buffers named like
    the float layer's weight, so state dict keys stay the same. `combine` is what fairscale's layer
    did with its ranks' outputs: "gather" them (a column-parallel output), "reduce" them (row-parallel),
    or nothing (model-parallel size 1, or a column-parallel layer whose outputs stay split)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, combine: Optional[str] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _combined(int8_linear(x, self.weight, self.scales), self.combine)


def absmax_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (out,) in float32 that map max|w[row]| to 127."""
    return (weight.float().abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)


# int4: the portable layout.

def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values in 0..15 -> (out, in/2) uint8, the even input feature in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """pack_nibbles' inverse: (out, in/2) uint8 -> (out, in) uint8 values in 0..15."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


_ELEMENTS_AT_ONCE = 1 << 22  # elements quantized at a time: bounds the float32 temporaries


def quantize_int4(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed (out, in/2) uint8, scales, zeros (out, in/group_size) float32) for weight (out, in)."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, groups, device=weight.device)
    zeros = torch.empty_like(scales)
    step = max(1, _ELEMENTS_AT_ONCE // in_features)
    for r in range(0, out_features, step):
        w = weight[r : r + step].to(torch.float32, copy=True).view(-1, groups, group_size)
        lo, hi = torch.aminmax(w, dim=-1)
        scale = ((hi - lo) / 15).clamp_(min=torch.finfo(torch.float32).tiny)
        q = w.sub_(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)  # in place on the copy
        packed[r : r + step] = pack_nibbles(q.view(-1, in_features))
        scales[r : r + step], zeros[r : r + step] = scale, lo + 8 * scale
    return packed, scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype` that the portable int4 tensors stand for: (q - 8) * scale + zero."""
    out_features, groups = scales.shape
    w = unpack_nibbles(packed).view(out_features, groups, -1).to(dtype)
    return w.sub_(8).mul_(scales.to(dtype)[..., None]).add_(zeros.to(dtype)[..., None]).view(out_features, -1)


# int4: the kernels.

def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Int4Kernel:
    """One of torch's int4 matmuls: how to lay a portable weight out for it, and how to call it."""

    name = ""
    row_multiple = 1  # the kernel's out-features must be a multiple of this; weights are padded with zero rows

    def pack(self, packed: torch.Tensor) -> torch.Tensor:
        """The kernel's layout of portable (out, in/2) nibbles; it may reuse their memory."""
        raise NotImplementedError

    def mm(self, x: torch.Tensor, weight: torch.Tensor, group_size: int,
           scales_and_zeros: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CPUInt4Kernel(Int4Kernel):
    """aten._weight_int4pack_mm_for_cpu: float32, bf16 or fp16 activations."""

    name = "cpu"
    row_multiple = 16
    _BLOCK_ROWS = 64  # the packing lays out each block of 64 rows (32 without AVX-512) in those rows' bytes
    _VALUES_AT_ONCE = 1 << 19
    # byte -> its (high, low) nibbles as int32, the packing's input
    _NIBBLES = torch.stack([torch.arange(256) >> 4, torch.arange(256) & 15], -1).to(torch.int32)

    def pack(self, packed: torch.Tensor) -> torch.Tensor:
        # Some blocks at a time, in place: loading holds no second copy of the weight. The packing takes
        # one int32 per value; the buffers for them are made once, as fresh ones per block left the
        # allocator holding more, and a few large steps stay fast when other processes want the cores.
        step = max(1, self._VALUES_AT_ONCE // (2 * packed.shape[1] * self._BLOCK_ROWS)) * self._BLOCK_ROWS
        index = torch.empty(min(step, packed.shape[0]) * packed.shape[1], dtype=torch.int32)
        values = torch.empty(index.numel(), 2, dtype=torch.int32)
        for r in range(0, packed.shape[0], step):
            rows = packed[r : r + step]
            n = rows.numel()
            index[:n].copy_(rows.reshape(-1))
            torch.index_select(self._NIBBLES, 0, index[:n], out=values[:n])
            rows.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(values[:n].view(rows.shape[0], -1), 1))
        return packed

    def mm(self, x, weight, group_size, scales_and_zeros):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight, group_size, scales_and_zeros)


class CUDAInt4Kernel(Int4Kernel):
    """aten._weight_int4pack_mm (tinygemm): bf16 activations on sm80 or newer. Its packing takes the
    portable (out, in/2) uint8 layout as it is and tiles it for the tensor cores."""

    name = "cuda"
    row_multiple = 8

    def pack(self, packed: torch.Tensor) -> torch.Tensor:
        in_features = 2 * packed.shape[1]
        inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)  # group sizes >= 32 allow 2
        return torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), inner_k_tiles)

    def mm(self, x, weight, group_size, scales_and_zeros):
        return torch.ops.aten._weight_int4pack_mm(x.contiguous(), weight, group_size, scales_and_zeros)


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def int4_kernel(device: torch.device, dtype: torch.dtype) -> Tuple[Optional[Int4Kernel], str]:
    """The int4 kernel for activations of `dtype` on `device`, or None and why the plain
    dequantize-and-matmul path runs instead."""
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    if version < (2, 6):  # older torch took other packed layouts
        return None, f"torch {torch.__version__} predates the int4 kernel layouts used here (2.6)"
    if device.type == "cpu":
        if not _has_op("_weight_int4pack_mm_for_cpu"):
            return None, "this torch build has no _weight_int4pack_mm_for_cpu"
        return _checked(CPUInt4Kernel, device, dtype)
    if device.type == "cuda":
        if torch.version.hip is not None:
            return None, "ROCm's tinygemm tiles differ from CUDA's"
        if not _has_op("_weight_int4pack_mm"):
            return None, "this torch build has no _weight_int4pack_mm"
        if dtype != torch.bfloat16:
            return None, f"_weight_int4pack_mm takes bf16 activations, not {dtype} (use --dtype bf16)"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return None, "_weight_int4pack_mm needs a GPU of compute capability 8.0 or newer"
        return _checked(CUDAInt4Kernel, device, dtype)
    return None, f"no int4 kernel for {device.type}"


@functools.lru_cache(maxsize=None)
def _checked(kind: type, device: torch.device, dtype: torch.dtype) -> Tuple[Optional[Int4Kernel], str]:
    """A `kind` kernel if, once per process, it gives the plain path's result on a small random layer:
    packed layouts are private to torch, so a version that changed them falls back rather than compute
    garbage."""
    kernel = kind()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(100, 256, generator=gen)  # 100 rows: padded for either kernel
    x = torch.randn(3, 256, generator=gen).to(device, dtype)
    packed, scales, zeros = (t.to(device) for t in quantize_int4(weight, 32))
    layer = Int4Linear.from_portable(packed, scales.to(dtype), zeros.to(dtype), group_size=32)
    expected = layer(x).float()
    try:
        layer.pack_(kernel)
        got = layer(x).float()
    except RuntimeError as e:
        return None, f"{kind.__name__} failed on this machine ({str(e).splitlines()[0]})"
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    if not torch.allclose(got, expected, atol=tol * expected.abs().max().item(), rtol=0):
        return None, f"{kind.__name__} disagrees with the plain path in torch {torch.__version__}"
    return kernel, ""


class Int4Linear(nn.Module):
    """A linear layer with an int4 weight, scales and zeros per group of `group_size` input features.

    Buffers: `weight`, at first in the portable layout (out, in/2) uint8, and `scales_and_zeros`
    (in/group_size, out, 2), the kernels' layout, of which `group_scales` and `group_zeros` are
    (out, in/group_size) views: a checkpoint fills all three row by row (a fused layer's parts are
    rows), and the plain path computes with them: dequantize, then matmul. `pack_` lays the weight out
    for a kernel, in place. `combine` as Int8Linear's."""

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 combine: Optional[str] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.out_features, self.in_features = weight.shape[0], 2 * weight.shape[1]
        self.group_size, self.combine = group_size, combine
        self.kernel: Optional[Int4Kernel] = None

    @classmethod
    def from_portable(cls, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      combine: Optional[str] = None) -> "Int4Linear":
        """The layer of quantize_int4's tensors, its scales and zeros in their dtype."""
        return cls(packed, torch.stack([scales.t(), zeros.t()], -1), group_size, combine)

    @property
    def group_scales(self) -> torch.Tensor:
        return self.scales_and_zeros[:, : self.out_features, 0].t()

    @property
    def group_zeros(self) -> torch.Tensor:
        return self.scales_and_zeros[:, : self.out_features, 1].t()

    def pack_(self, kernel: Int4Kernel) -> None:
        """Lay the weight out for `kernel` (after zero rows up to the kernel's multiple, if it needs them)."""
        rows = _round_up(self.out_features, kernel.row_multiple)
        if rows != self.out_features:
            pad = self.scales_and_zeros.new_zeros(self.scales_and_zeros.shape[0], rows - self.out_features, 2)
            self.scales_and_zeros = torch.cat([self.scales_and_zeros, pad], dim=1)
        self.weight = kernel.pack(_pad_rows(self.weight, rows))
        self.kernel = kernel

    def extra_repr(self) -> str:
        kernel = "dequantize" if self.kernel is None else self.kernel.name
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, kernel={kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel is None:
            y = F.linear(flat, dequantize_int4(self.weight, self.group_scales, self.group_zeros, x.dtype))
        else:
            y = self.kernel.mm(flat, self.weight, self.group_size, self.scales_and_zeros)[:, : self.out_features]
        return _combined(y.reshape(*x.shape[:-1], self.out_features), self.combine)


# Packed CPU linears: fbgemm.

PACK_KINDS = ("fp16", "int8")
_PACK_VALUES = 1 << 22  # weight values packed at a time: bounds a load's float32 temporaries
# Smaller layers stay plain: fbgemm's cost per call (tens of microseconds: its activation quantizing,
# its threads) outweighs what it saves in streaming under about a megabyte of weights.
PACK_MIN_VALUES = 1 << 20
# fbgemm lays the in-features out in blocks of 512 (zeros after the last): a layer whose in-features
# would grow by more than this fraction stays plain, as the padding is memory and streaming too.
_K_BLOCK, _MAX_PADDING = 512, 0.05
_PACKED: "weakref.WeakValueDictionary[int, PackedLinear]" = weakref.WeakValueDictionary()  # key -> layer, for compile
_KEYS = itertools.count()
FP16_MAX = 65504.0


def _blocks(rows: int, cols: int, values: int) -> List[Tuple[int, int]]:
    step = max(1, values // max(cols, 1))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def pack_fp16(weight: torch.Tensor) -> object:
    """fbgemm's fp16 layout of a float weight (out, in)."""
    return torch.ops.quantized.linear_prepack_fp16(weight.float(), None)


def pack_int8(weight: torch.Tensor, scales: torch.Tensor) -> object:
    """fbgemm's layout of an int8 weight (out, in) with per-output-channel `scales`."""
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packing still takes one
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(weight, scales.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(q, None)


class PackedLinear(nn.Module):
    """A linear whose weight fbgemm laid out at load, as blocks of output rows (TorchBind objects,
    not tensors): `kind` "fp16" (a bf16 weight held as fp16) or "int8" (see the module docstring).
    Outputs come back in the activations' dtype. `combine` as Int8Linear's."""

    def __init__(self, blocks: List[object], out_features: int, in_features: int, kind: str,
                 combine: Optional[str] = None):
        super().__init__()
        if kind not in PACK_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {PACK_KINDS}")
        self.blocks, self.kind, self.combine = blocks, kind, combine
        self.out_features, self.in_features = out_features, in_features
        self.key = next(_KEYS)
        _PACKED[self.key] = self

    @property
    def nbytes(self) -> int:
        """The packed weight's bytes: fbgemm pads the in-features to a multiple of 512."""
        per_value = 2 if self.kind == "fp16" else 1
        padded = _round_up(self.in_features, _K_BLOCK)
        return self.out_features * padded * per_value + (4 * self.out_features if self.kind == "int8" else 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kind={self.kind}, blocks={len(self.blocks)}"

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) in x's dtype."""
        if self.kind == "fp16":
            xf = x.float()
            ys = [torch.ops.quantized.linear_dynamic_fp16(xf, b) for b in self.blocks]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
            return y.to(x.dtype)
        row_max = x.abs().amax(-1, keepdim=True).float()  # (rows, 1)
        if self.combine == "reduce" and fs_init.get_model_parallel_world_size() > 1:  # each rank holds part of a row
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=fs_init.get_model_parallel_group())
        row_max.clamp_(min=torch.finfo(torch.float32).tiny)
        # Every row divided by its max |x|, and one more row that spans [-1, 1]: fbgemm's one scale for
        # the whole tensor is then the same at every call, so a row's result depends on that row alone.
        xn = torch.cat([x.float() / row_max, self._span()], dim=0)
        ys = [torch.ops.quantized.linear_dynamic(xn, b, True) for b in self.blocks]
        y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1))[:-1]
        return y.mul_(row_max).to(x.dtype)

    def _span(self) -> torch.Tensor:
        span = torch.zeros(1, self.in_features)
        span[0, 0], span[0, -1] = 1.0, -1.0
        return span

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        # Compiled graphs cannot hold fbgemm's objects: they call the layer through an opaque op.
        y = torch.ops.llama.packed_linear(flat, self.key) if torch.compiler.is_compiling() else self.mm(flat)
        return _combined(y.view(*x.shape[:-1], self.out_features), self.combine)


@torch.library.custom_op("llama::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, key: int) -> torch.Tensor:
    return _PACKED[key].mm(x)


@_packed_linear.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _PACKED[key].out_features)


def _drop_rows(weight: torch.Tensor, rows: slice) -> None:
    """Hand the whole pages under `weight[rows]` back to the system (they read as zeros after): a
    weight being packed gives up each block once it is packed, so the load never holds it twice."""
    block = weight[rows]
    if _libc is None or block.numel() == 0 or not weight.is_contiguous():
        return
    page = mmap.PAGESIZE
    start = -(-block.data_ptr() // page) * page
    end = (block.data_ptr() + block.numel() * block.element_size()) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def packed_fp16_linear(weight: torch.Tensor, combine: Optional[str] = None, block_values: int = _PACK_VALUES,
                       consume: bool = False) -> PackedLinear:
    """A PackedLinear of float `weight` (out, in), packed `block_values` at a time (whole rows). With
    `consume`, each block of `weight` is given up (zeroed) once packed: for a weight nothing else holds."""
    out_features, in_features = weight.shape
    spans = _blocks(out_features, in_features, block_values)
    stage = torch.empty(spans[0][1] * in_features)  # float32 rows for the packing, made once
    blocks = []
    for a, b in spans:
        blocks.append(pack_fp16(stage[: (b - a) * in_features].view(b - a, in_features).copy_(weight[a:b])))
        if consume:
            _drop_rows(weight, slice(a, b))
    return PackedLinear(blocks, out_features, in_features, "fp16", combine)


def packed_int8_linear(weight: torch.Tensor, scales: torch.Tensor, combine: Optional[str] = None,
                       block_values: int = _PACK_VALUES, consume: bool = False) -> PackedLinear:
    """A PackedLinear of int8 `weight` (out, in) and its per-output-channel `scales`, as packed_fp16_linear."""
    out_features, in_features = weight.shape
    blocks = []
    for a, b in _blocks(out_features, in_features, block_values):
        blocks.append(pack_int8(weight[a:b], scales[a:b].float()))
        if consume:
            _drop_rows(weight, slice(a, b))
    return PackedLinear(blocks, out_features, in_features, "int8", combine)


FBGEMM_OPS = {"fp16": ("linear_prepack_fp16", "linear_dynamic_fp16"), "int8": ("linear_prepack", "linear_dynamic")}


def _fbgemm_missing(kind: str) -> Optional[str]:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm (torch.backends.quantized.supported_engines)"
    for op in FBGEMM_OPS[kind]:
        if not hasattr(torch.ops.quantized, op):
            return f"this torch build has no torch.ops.quantized.{op}"
    return None


@functools.lru_cache(maxsize=None)
def packed_kernel(kind: str) -> Tuple[bool, str]:
    """Whether `kind` packing is available here and, once per process, gives the plain path's result
    on a small random layer (several rows, two blocks); else False and why."""
    missing = _fbgemm_missing(kind)
    if missing:
        return False, missing
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 160, generator=gen) * 0.05
    x = torch.randn(3, 160, generator=gen) * torch.tensor([[1.0], [30.0], [0.01]])  # rows of other magnitudes
    two_blocks = 160 * 64
    try:
        if kind == "fp16":
            w = weight.bfloat16()
            layer, expected = packed_fp16_linear(w, block_values=two_blocks), F.linear(x.bfloat16().float(), w.float())
            got, tol = layer(x.bfloat16()).float(), 1e-2
        else:
            scales = absmax_scales(weight)
            q = quantize_weight(weight, scales)
            layer, expected = packed_int8_linear(q, scales, block_values=two_blocks), int8_linear(x, q, scales)
            got, tol = layer(x), 3e-2  # 7-bit activations
    except RuntimeError as e:
        return False, f"fbgemm {kind} failed on this machine ({str(e).splitlines()[0]})"
    err = ((got - expected).abs().amax(-1) / expected.abs().amax(-1)).max().item()  # per row: scales differ
    if not err <= tol:
        return False, f"fbgemm {kind} disagrees with the plain path in torch {torch.__version__} (error {err:.2g})"
    return True, ""


def _fits_fp16(weight: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(weight)  # no |w| temporary the size of the weight
    return bool(lo >= -FP16_MAX) and bool(hi <= FP16_MAX)


def _pack_kind(layer: nn.Module) -> Optional[str]:
    """The packing a CPU layer takes: "int8", "fp16" (a bf16 float linear), or None."""
    if isinstance(layer, Int8Linear) and layer.weight.device.type == "cpu":
        return "int8"
    if isinstance(layer, (nn.Linear, ColumnParallelLinear, RowParallelLinear)) and layer.weight.device.type == "cpu":
        return "fp16" if layer.weight.dtype == torch.bfloat16 else None
    return None


def pack_linears_(model: nn.Module, min_values: int = PACK_MIN_VALUES) -> Dict[str, int]:
    """Replace a loaded CPU model's bf16 and int8 linears by PackedLinear (see the module docstring),
    where fbgemm is here and agrees with the plain path; the count of each kind packed. Float32 and
    fp16 models keep their layers (float32's plain matmul already streams at the machine's read rate),
    and so do int4 ones, layers of fewer than `min_values` weights and (unless min_values is 0, as tests
    pass) layers whose in-features fbgemm would pad by more than 5%. Each plain layer goes as soon as its packed one replaces it, so the load
    holds one copy of the weights and a block's temporaries."""
    places = [(parent, attr) for parent in model.modules() for attr, _ in parent.named_children()]
    storages: Dict[int, int] = {}  # storage address -> how many of the model's tensors use it
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        storages[key] = storages.get(key, 0) + 1
    counts: Dict[str, int] = {}
    usable: Dict[str, bool] = {}
    for parent, attr in places:
        kind = _pack_kind(getattr(parent, attr))
        if kind is None or getattr(parent, attr).weight.numel() < min_values:
            continue
        in_features = getattr(parent, attr).weight.shape[1]
        if _round_up(in_features, _K_BLOCK) > (1 + _MAX_PADDING) * in_features and min_values > 0:
            continue
        if kind not in usable:
            usable[kind], why = packed_kernel(kind)
            if not usable[kind]:
                log.warning("packed linears: %s layers keep the plain path: %s", kind, why)
        if not usable[kind]:
            continue
        layer = getattr(parent, attr)
        own = storages.get(layer.weight.untyped_storage().data_ptr()) == 1  # not tied to another tensor
        if kind == "int8":
            packed = packed_int8_linear(layer.weight, layer.scales, layer.combine, consume=own)
        elif _fits_fp16(layer.weight):
            packed = packed_fp16_linear(layer.weight, _combine(layer), consume=own)
        else:
            log.info("packed linears: a bf16 layer holds values past fp16's %g and keeps the plain path", FP16_MAX)
            continue
        del layer
        setattr(parent, attr, packed)  # the plain layer, and its weight, go now
        counts[kind] = counts.get(kind, 0) + 1
    if counts:
        log.info("packed linears: %s", ", ".join(f"{n} {k}" for k, n in counts.items()))
    return counts


# Whole models.

def _combine(layer: nn.Module) -> Optional[str]:
    if isinstance(layer, RowParallelLinear):
        return "reduce"
    return "gather" if isinstance(layer, ColumnParallelLinear) and layer.gather_output else None


def linears(model: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Module, List[str]]]:
    """(parent, attribute, layer, checkpoint names) for every float linear layer of `model`: a fused
    wqkv / w13 stands for its parts' names ("layers.0.attention.wq", ...). Only the parents are listed
    ahead, so a layer the caller replaces is freed then, not after the last one."""
    kinds = (nn.Linear, ColumnParallelLinear, RowParallelLinear)
    found = [(path, parent, attr) for path, parent in model.named_modules()
             for attr, child in parent.named_children() if isinstance(child, kinds)]
    for path, parent, attr in found:
        prefix = f"{path}." if path else ""
        parts = list(parent.parts()) if getattr(parent, "fused", None) == attr else [attr]
        yield parent, attr, getattr(parent, attr), [prefix + p for p in parts]


def _group_size(layout: Layout, names: List[str]) -> Optional[int]:
    """The group size of a layer standing for checkpoint linears `names`: one for all its parts."""
    sizes = {layout[n] for n in names}
    if len(sizes) != 1:
        raise CheckpointError(f"{', '.join(names)} are fused into one layer but quantized differently "
                              f"({[layout[n] for n in names]}): quantize the float checkpoint again")
    return sizes.pop()


def quantize_model_(model: nn.Module, layout: Optional[Layout] = None) -> nn.Module:
    """Quantize every float linear of a loaded model in place as `layout` (see `plan`; None: int8 for
    every layer) says. All ranks call this; int8 row-parallel layers agree on scales with an all-reduce."""
    split = fs_init.get_model_parallel_world_size() > 1
    for parent, attr, layer, names in linears(model):
        group_size = None if layout is None else _group_size(layout, names)
        if group_size is not None:
            q, scales, zeros = quantize_int4(layer.weight, group_size)
            dtype = layer.weight.dtype
            setattr(parent, attr, Int4Linear.from_portable(q, scales.to(dtype), zeros.to(dtype), group_size,
                                                           _combine(layer)))
            continue
        scales = absmax_scales(layer.weight)
        if split and isinstance(layer, RowParallelLinear):  # each rank holds part of every row
            dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=fs_init.get_model_parallel_group())
        q = quantize_weight(layer.weight, scales)
        setattr(parent, attr, Int8Linear(q, scales.to(layer.weight.dtype), _combine(layer)))
    return model


def prepare_quantized_(model: nn.Module, layout: Layout) -> None:
    """Give every linear of a model built on the meta device the layout of a quantized checkpoint,
    in the portable int4 form, for the checkpoint to fill."""
    for parent, attr, layer, names in linears(model):
        w, group_size = layer.weight, _group_size(layout, names)
        out_features, in_features = w.shape
        if group_size is None:
            q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
            setattr(parent, attr, Int8Linear(q, torch.empty(out_features, device=w.device), _combine(layer)))
            continue
        q = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=w.device)
        # Made as it is, not stacked: the first stack on the meta device imports ~800 torch modules (75 MB).
        scales_and_zeros = torch.empty(in_features // group_size, out_features, 2, device=w.device)
        setattr(parent, attr, Int4Linear(q, scales_and_zeros, group_size, _combine(layer)))


def pack_int4_(model: nn.Module) -> Optional[str]:
    """Lay every int4 layer of a loaded model out for the kernel of its device and dtype; the kernel's
    name ("cpu", "cuda", or "dequantize" for the plain path), None without int4 layers. The log says
    which, and why the plain path runs where it does."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.kernel is None]
    if not layers:
        return None
    kernel, why = int4_kernel(layers[0].weight.device, layers[0].scales_and_zeros.dtype)
    if kernel is None:
        log.warning("int4: no kernel (%s): each int4 layer dequantizes its weight and runs a plain matmul, "
                    "slower than int8", why)
        return "dequantize"
    for layer in layers:
        layer.pack_(kernel)
    log.info("int4: %d layer(s) on the %s kernel", len(layers), kernel.name)
    return kernel.name


def quantize_state_dict(full: Dict[str, torch.Tensor], layout: Optional[Layout] = None) -> Dict[str, torch.Tensor]:
    """A whole-model float state dict with every linear weight quantized as `layout` says (None: int8
    everywhere), in the portable checkpoint layout (see the module docstring)."""
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if not (name.endswith(".weight") and tensor.dim() == 2 and name != "tok_embeddings.weight"):
            out[name] = tensor
            continue
        prefix = name[: -len(".weight")]
        group_size = None if layout is None else layout[prefix]
        if group_size is None:
            scales = absmax_scales(tensor)
            out[name], out[prefix + _SCALES] = quantize_weight(tensor, scales), scales
        else:
            out[name], *groups = quantize_int4(tensor, group_size)
            out.update({f"{prefix}.{leaf}": t for leaf, t in zip(INT4_LEAVES, groups)})
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters and quantized weights (the KV cache and RoPE table excluded)."""
    tensors: Dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            tensors.update({id(t): t for t in module.buffers(recurse=False)})
    packed = sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + packed
