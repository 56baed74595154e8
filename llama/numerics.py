"""Find where NaN/inf come from, so an fp16 overflow or a bad weight is named, not sampled."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import nn


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN or inf.

    Unlike `isfinite(t).all()`, which builds an abs() copy and bool masks as large as `t`, this
    reduces in place: at load, where it checks every tensor, those temporaries of the largest one
    would set the peak memory.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # a NaN anywhere makes both NaN; an inf shows as the min or max
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def first_nonfinite(model: nn.Module, run: Callable[[], object]) -> Optional[str]:
    """Call `run` (which runs `model`) and name the first module whose inputs are finite but whose
    output is not, e.g. "layers.1.feed_forward.w13 (Linear, torch.float16, max |x| = inf)".

    Only called after non-finite logits were seen, so the hot path pays nothing. Re-running a step
    writes the same values to the same KV-cache slots, so the cache is left as it was.
    """
    culprit: List[str] = []

    def finite(x) -> bool:
        return not isinstance(x, torch.Tensor) or not x.is_floating_point() or bool(torch.isfinite(x).all())

    def hook(name: str):
        def check(module, inputs, output):
            if not culprit and all(finite(x) for x in inputs) and not finite(output):
                magnitude = output.detach().float().abs()
                worst = magnitude.masked_fill(magnitude.isnan(), float("inf")).max().item()
                culprit.append(f"{name or 'model'} ({type(module).__name__}, {output.dtype}, max |x| = {worst:g})")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return culprit[0] if culprit else None


def locate_nonfinite(model: nn.Module, tokens: torch.Tensor, start: int = 0) -> Optional[str]:
    """`first_nonfinite` for a forward of `tokens` (B, T) from position `start`, each row in blocks of
    its own (Transformer.layout)."""
    return first_nonfinite(model, lambda: model(tokens, *model.layout(*tokens.shape[:1], start, tokens.shape[1])))
