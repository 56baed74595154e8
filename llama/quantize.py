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

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn


MODES = ("int8",)
_SCALES = ".scales"  # suffix of a weight's scales in a quantized state dict: "....wq.scales"


def check_mode(mode: Optional[str]) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not supported: use one of {MODES} or None")


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T for int8 `weight` (out, in)."""
    if x.device.type == "cpu":  # a kernel that converts the int8 weight on the fly
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales.to(x.dtype))
        return out.view(*x.shape[:-1], weight.shape[0])  # (..., out)
    # Elsewhere a cast and a scale. It makes a float copy of the weight per call; on an H100 a
    # compiled int8 decode step ran at 1.8x transformers' bf16, not yet above our own bf16.
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


def absmax_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (out,) in float32 that map max|w[row]| to 127."""
    return (weight.float().abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)


def _to_int8_layout(layer: nn.Module, q: torch.Tensor, scales: torch.Tensor) -> None:
    # The weight becomes an int8 buffer under the same name, so state_dict keys stay the same.
    del layer.weight
    layer.register_buffer("weight", q)
    layer.register_buffer("scales", scales)


def _linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def quantize_model_(model: nn.Module) -> nn.Module:
    """Quantize every column/row-parallel linear of a loaded model in place (all ranks call this)."""
    split = fs_init.get_model_parallel_world_size() > 1
    for layer in _linears(model):
        if getattr(layer, "scales", None) is not None:
            continue  # already int8 (loaded from a quantized checkpoint)
        scales = absmax_scales(layer.weight)
        if split and isinstance(layer, RowParallelLinear):  # each rank holds part of every row
            dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=fs_init.get_model_parallel_group())
        _to_int8_layout(layer, quantize_weight(layer.weight, scales), scales.to(layer.weight.dtype))
    return model


def prepare_for_state_(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Give `model` the int8 layout where `state` (a rank's shard) holds int8 weights, so it loads."""
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name + _SCALES in state:
            w = module.weight
            _to_int8_layout(module, torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0]))


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
    for module in _linears(model):
        for t in (module.weight, getattr(module, "scales", None)):
            if t is not None:
                tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())
