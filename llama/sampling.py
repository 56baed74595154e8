"""Choosing the next token: greedy, temperature, top-k and top-p."""
from __future__ import annotations

from typing import Optional

import torch

def check_sampling(temperature: float, top_p: float, top_k: int = 0) -> None:
    if not isinstance(temperature, (int, float)) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]; use 1.0 to disable nucleus sampling")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0; use 0 to disable top-k sampling")


def sample_top_p(probs: torch.Tensor, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Sample one token per row from the smallest set of tokens whose probability exceeds `top_p`."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before > top_p] = 0.0  # the top token always survives: its mass_before is 0
    sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of (B, vocab) logits: argmax at temperature 0, else top-k, then top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shift the max to 0 first: then even a temperature so small that 1/temperature overflows
    # gives -inf for the other tokens and 0 for the top one, never inf - inf = NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(logits.dtype).tiny)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return sample_top_p(torch.softmax(logits, dim=-1), top_p, generator)
