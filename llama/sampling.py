"""How a request samples (SamplingParams, checked once) and the batched sampler: greedy, or
temperature, then top-k, then top-p (nucleus).

Every row has its own parameters and its own `torch.Generator`, so a seeded row draws the same
tokens whatever else shares its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import FrozenSet, List, Mapping, Optional, Sequence, Tuple

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


def _check_number(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be a number in {bound}")
    return float(value)


MAX_LOGIT_BIAS = 300  # entries of logit_bias, as OpenAI allows
MAX_TOP_LOGPROBS = 20
CONSTRAINTS = ("json_object", "json_schema", "regex", "lark", "gbnf")


@dataclass(frozen=True)
class Constraint:
    """What the generated text must match, enforced token by token (llama.grammar): any JSON object
    ("json_object"), a JSON Schema ("json_schema", `spec` its JSON text), a regular expression
    ("regex"), or a grammar in Lark or GBNF notation ("lark", "gbnf")."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINTS:
            raise ValueError(f"constraint kind {self.kind!r} must be one of {', '.join(CONSTRAINTS)}")
        if not isinstance(self.spec, str) or (self.kind != "json_object" and not self.spec):
            raise ValueError(f"a {self.kind} constraint needs its {self.kind} as a non-empty string")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued; checked when made, so that a bad value fails before any work.

    Each new token is drawn from the model's logits after, in this order: `repetition_penalty`
    (CTRL's: a logit of a token seen in the prompt or the output is divided by it if positive,
    multiplied if negative; 1 leaves them), `frequency_penalty` and `presence_penalty` (OpenAI's:
    minus frequency x its count and presence x [count > 0], over the output), `logit_bias` (token
    id -> a bias added to its logit), the `constraint` (tokens that would break it are masked out);
    then greedily (temperature 0) or from its generator after temperature, `top_k`, `top_p` and
    `min_p` (tokens below min_p x the top token's probability are dropped).

    `max_tokens`: new tokens at most (None: until max_seq_len). `stop`: strings that end the text
    (the text stops before them); `stop_token_ids`: tokens that end it besides the tokenizer's own.
    `seed`: the first prompt's generator seed (prompt i uses seed + i; None: drawn). `logprobs`:
    report each new token's log-probability, with its `top_logprobs` most likely alternatives;
    `prompt_logprobs`: each prompt token's too (echo). Log-probabilities are the model's own,
    before any penalty, bias, constraint or temperature.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: FrozenSet[int] = frozenset()
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    constraint: Optional[Constraint] = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k)
        _check_number("min_p", self.min_p, 0.0, 1.0)
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
        _check_int("top_logprobs", self.top_logprobs, 0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={self.top_logprobs} must be at most {MAX_TOP_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), -2.0, 2.0)
        if not (isinstance(self.repetition_penalty, (int, float)) and not isinstance(self.repetition_penalty, bool)
                and math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be a number > 0 (1: none)")
        object.__setattr__(self, "logit_bias", _checked_bias(self.logit_bias))
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint={self.constraint!r} must be a llama.sampling.Constraint")

    @property
    def penalized(self) -> bool:
        """Whether sampling reads the tokens so far (a penalty applies)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _checked_bias(bias) -> Tuple[Tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a mapping or pairs; ids >= 0, biases in [-100, 100]."""
    if not bias:
        return ()
    items = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    if len(items) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(items)} entries: at most {MAX_LOGIT_BIAS}")
    out = {}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError("logit_bias must map token ids to biases")
        token, value = item
        if isinstance(token, str) and token.strip().lstrip("-").isdigit():
            token = int(token)  # JSON object keys are strings
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"logit_bias key {token!r} is not a token id (an integer >= 0)")
        out[token] = _check_number(f"logit_bias[{token}]", value, -100.0, 100.0)
    return tuple(sorted(out.items()))


def penalize(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor,
             frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Logits (R, V) after each row's penalties: `seen` (R, V) marks the tokens of its prompt and output
    (repetition), `counts` (R, V) counts those of its output (frequency, presence); the penalties are
    (R,) tensors."""
    repeated = torch.where(logits > 0, logits / repetition[:, None], logits * repetition[:, None])
    logits = torch.where(seen, repeated, logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def sample(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int],
           min_p: Sequence[float], generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row of (B, vocab) float logits: the argmax where the row's temperature is 0, else a
    draw from its generator among its top_k tokens (0: all), then the smallest set of those whose
    probability exceeds top_p, then those at least min_p times the top one's probability."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperature) if t > 0]
    if not rows:
        return tokens
    ranked, order, probs = warp(logits[rows], [temperature[i] for i in rows], [top_p[i] for i in rows],
                                [top_k[i] for i in rows], [min_p[i] for i in rows])
    V = logits.shape[-1]
    cdf = probs.cumsum(dim=-1)  # (R, V), unnormalized: a draw is scaled by the row's total instead
    draws = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(logits.device)
    choice = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp(max=V - 1)  # (R, 1)
    tokens[rows] = order.gather(-1, choice).squeeze(-1)
    return tokens


def warp(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int],
         min_p: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What rows (R, V) of logits are drawn from: their tokens ranked (scaled logits in descending order,
    and the order), and the unnormalized probabilities of the ranked tokens after temperature, top-k,
    top-p and min-p, in that order (transformers' order). Temperatures must be > 0."""
    device, V = logits.device, logits.shape[-1]
    temps = torch.tensor([max(t, torch.finfo(logits.dtype).tiny) for t in temperature], device=device)
    # Shift the max to 0 first: then even a temperature so small that 1/temperature overflows gives
    # -inf for the other tokens and 0 for the top one, never inf - inf = NaN.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temps[:, None]
    ranked, order = scaled.sort(dim=-1, descending=True)  # (R, V): the same sort serves top-k, top-p, min-p
    ks = torch.tensor([k if 0 < k < V else V for k in top_k], device=device)
    probs = torch.softmax(ranked.masked_fill(torch.arange(V, device=device) >= ks[:, None], float("-inf")), dim=-1)
    ps = torch.tensor(list(top_p), device=device)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before > ps[:, None], 0.0)  # the top token always survives: its mass_before is 0
    floor = torch.tensor(list(min_p), device=device)[:, None] * probs[:, :1]  # probs[:, 0] is each row's top
    return ranked, order, probs.masked_fill(probs < floor, 0.0)


def top_logprobs(logprobs: torch.Tensor, k: int) -> Tuple[List[List[int]], List[List[float]]]:
    """The k most likely tokens of each row of log-probabilities (R, V), with theirs."""
    values, ids = logprobs.topk(k, dim=-1)
    return ids.tolist(), values.tolist()
