"""The library's error types and the argument check every module shares.

Each error names the problem and the fix. `llama.distributed.on_every_rank` re-creates them by
name on ranks that did not raise them, so they live here, below every other module.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is."""


class NonFiniteError(ValueError):
    """A weight or activation holds NaN or inf."""


class LogitsError(NonFiniteError):
    """The model produced logits no token can be sampled from (NaN, +inf, or all -inf)."""


def check_positive_int(name: str, value) -> int:
    """`value` if it is an int > 0 (not a bool), else a ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value
