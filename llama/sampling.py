"""How a request samples (SamplingParams, checked once) and the batched sampler: greedy, or
temperature, then top-k, then top-p (nucleus).

Every row has its own parameters and its own `torch.Generator`, so a seeded row draws the same
tokens whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence, Tuple

import torch

from llama.text import check_stop


def check_sampling(temperature: float, top_p: float, top_k: int = 0) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]; use 1.0 to disable nucleus sampling")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0; use 0 to disable top-k sampling")


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued; checked when made, so that a bad value fails before any work.

    `max_tokens`: new tokens at most (None: until max_seq_len). `stop`: strings that end the text
    (the text stops before them); `stop_token_ids`: tokens that end it besides the tokenizer's own.
    `seed`: the first prompt's generator seed (prompt i uses seed + i; None: drawn). `logprobs`:
    report each new token's log-probability; `prompt_logprobs`: each prompt token's too (echo).
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    max_tokens: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: FrozenSet[int] = frozenset()
    seed: Optional[int] = None
    logprobs: bool = False
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63))
        object.__setattr__(self, "stop", tuple(check_stop(None if self.stop == () else self.stop)))
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in (ids or ())):
            raise ValueError(f"stop_token_ids={ids!r} must be token ids (integers >= 0)")
        object.__setattr__(self, "stop_token_ids", frozenset(ids or ()))
        for name in ("logprobs", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")


def sample(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int],
           generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row of (B, vocab) float logits: the argmax where the row's temperature is 0, else a
    draw from its generator among its top_k tokens (0: all), then the smallest set of those whose
    probability exceeds top_p."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperature) if t > 0]
    if not rows:
        return tokens
    device, V = logits.device, logits.shape[-1]
    index = torch.tensor(rows, device=device)
    temps = torch.tensor([max(temperature[i], torch.finfo(logits.dtype).tiny) for i in rows], device=device)
    # Shift the max to 0 first: then even a temperature so small that 1/temperature overflows gives
    # -inf for the other tokens and 0 for the top one, never inf - inf = NaN.
    scaled = logits[index]
    scaled = (scaled - scaled.amax(dim=-1, keepdim=True)) / temps[:, None]
    ranked, order = scaled.sort(dim=-1, descending=True)  # (R, V): the same sort serves top-k and top-p
    ks = torch.tensor([top_k[i] if 0 < top_k[i] < V else V for i in rows], device=device)
    probs = torch.softmax(ranked.masked_fill(torch.arange(V, device=device) >= ks[:, None], float("-inf")), dim=-1)
    ps = torch.tensor([top_p[i] for i in rows], device=device)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before > ps[:, None], 0.0)  # the top token always survives: its mass_before is 0
    cdf = probs.cumsum(dim=-1)  # (R, V), unnormalized: a draw is scaled by the row's total instead
    draws = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(device)
    choice = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp(max=V - 1)  # (R, 1)
    tokens[index] = order.gather(-1, choice).squeeze(-1)
    return tokens
