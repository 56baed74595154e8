"""Find where NaN/inf come from, so an fp16 overflow or a bad weight is named, not sampled."""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn


class NonFiniteError(ValueError):
    """A weight or activation holds NaN or inf."""


def locate_nonfinite(model: nn.Module, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0) -> Optional[str]:
    """Re-run `model` on `tokens` and name the first module whose inputs are finite but whose output is not.

    Only called after non-finite logits were seen, so the hot path pays nothing. The re-run writes
    the same values to the same KV-cache slots, so the cache is left as it was.
    """
    culprit: List[str] = []

    def finite(x) -> bool:
        return not isinstance(x, torch.Tensor) or not x.is_floating_point() or bool(torch.isfinite(x).all())

    def hook(name: str):
        def check(module, inputs, output):
            if not culprit and all(finite(x) for x in inputs) and not finite(output):
                worst = output.detach().float().abs().nan_to_num(nan=float("inf")).max().item()
                culprit.append(f"{name or 'model'} ({type(module).__name__}, {output.dtype}, max |x| = {worst:g})")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.inference_mode():
            model(tokens, start_pos)
    finally:
        for h in handles:
            h.remove()
    return culprit[0] if culprit else None
