"""Weight-only int8 quantization in plain PyTorch.

Each linear weight (out, in) becomes int8 values plus one scale per output channel:
w ≈ q * scale[:, None], scale = max|w[row]| / 127. Activations stay in the model's dtype.
The token embedding stays as it is (a decode step reads one of its rows, not all of it).

Under model parallelism a row-parallel weight (wo, w2) is split along its input dim, so a
rank holds part of every row: the scale is the maximum over all ranks' parts, which makes
the quantized model the same whatever the number of shards. A column-parallel weight's
rows (and so its scales) are split like the weight itself.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

MODES = ("int8",)
_SCALES = ".scales"  # suffix of a weight's scales in a quantized state dict: "....wq.scales"


def check_mode(mode: Optional[str]) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported: use one of {MODES} or None")


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T for int8 `weight` (out, in) and `scales` in x's dtype."""
    # On CPU a kernel that converts the int8 weight on the fly; in torch 2.13 it crashes (SIGSEGV) on
    # bf16 activations of several rows when the in-features are not a multiple of 16.
    if x.device.type == "cpu" and (x.dtype != torch.bfloat16 or weight.shape[1] % 16 == 0):
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)
        return out.view(*x.shape[:-1], weight.shape[0])  # (..., out)
    # Elsewhere a cast and a scale. It makes a float copy of the weight per call; on an H100 a
    # compiled int8 decode step ran at 1.8x transformers' bf16, not yet above our own bf16.
    return F.linear(x, weight.to(x.dtype)) * scales


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
        y = int8_linear(x, self.weight, self.scales)
        if self.combine == "gather":
            return gather_from_model_parallel_region(y)
        return reduce_from_model_parallel_region(y) if self.combine == "reduce" else y


def _combine(layer: nn.Module) -> Optional[str]:
    if isinstance(layer, RowParallelLinear):
        return "reduce"
    return "gather" if isinstance(layer, ColumnParallelLinear) and layer.gather_output else None


def absmax_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (out,) in float32 that map max|w[row]| to 127."""
    return (weight.float().abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)


def linears(model: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) for every float linear layer of `model`."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
                yield parent, attr, child


def quantize_model_(model: nn.Module) -> nn.Module:
    """Quantize every float linear of a loaded model in place (all ranks call this)."""
    split = fs_init.get_model_parallel_world_size() > 1
    for parent, attr, layer in linears(model):
        scales = absmax_scales(layer.weight)
        if split and isinstance(layer, RowParallelLinear):  # each rank holds part of every row
            dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=fs_init.get_model_parallel_group())
        q = quantize_weight(layer.weight, scales)
        setattr(parent, attr, Int8Linear(q, scales.to(layer.weight.dtype), _combine(layer)))
    return model


def prepare_int8_(model: nn.Module) -> None:
    """Give every linear of a model built on the meta device the int8 layout, for an int8 checkpoint."""
    for parent, attr, layer in linears(model):
        w = layer.weight
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        setattr(parent, attr, Int8Linear(q, torch.empty(w.shape[0], device=w.device), _combine(layer)))


def quantize_state_dict(full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A whole-model float state dict with every linear weight as int8 plus `NAME.scales` (float32)."""
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if name.endswith(".weight") and tensor.dim() == 2 and name != "tok_embeddings.weight":
            scales = absmax_scales(tensor)
            out[name] = quantize_weight(tensor, scales)
            out[name[: -len(".weight")] + _SCALES] = scales
        else:
            out[name] = tensor
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters and quantized weights (the KV cache and RoPE table excluded)."""
    tensors: Dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, Int8Linear):
            tensors.update({id(module.weight): module.weight, id(module.scales): module.scales})
    return sum(t.numel() * t.element_size() for t in tensors.values())
