"""Decoding options: validated before any model work, then handed to transformers' ``generate``.

Options the caller does not give keep the checkpoint's own ``generation_config`` values (what the
transformers reference uses too), except ``max_new_tokens``, which defaults to 256.
"""

from __future__ import annotations

import math
from typing import Any

# name: (kind, low, high, low_inclusive) — the ranges transformers accepts, capped where a larger value
# only burns time on a shared demo.
RANGES: dict[str, tuple[type, float, float, bool]] = {
    "max_new_tokens": (int, 1, 2048, True),
    "min_new_tokens": (int, 0, 2048, True),
    "num_beams": (int, 1, 10, True),
    "top_p": (float, 0.0, 1.0, False),
    "temperature": (float, 0.0, 10.0, False),
    "repetition_penalty": (float, 1.0, 10.0, True),
    "length_penalty": (float, -10.0, 10.0, True),
}
DEFAULT_MAX_NEW_TOKENS = 256

# The defaults of the InstructBLIP authors' demo (what the app's decoding panel starts from).
INSTRUCTBLIP_DEFAULTS: dict[str, Any] = {
    "num_beams": 5,
    "do_sample": False,
    "max_new_tokens": 256,
    "min_new_tokens": 1,
    "top_p": 0.9,
    "temperature": 1.0,
    "repetition_penalty": 1.5,
    "length_penalty": 1.0,
}


def _describe(name: str) -> str:
    kind, low, high, low_inclusive = RANGES[name]
    if kind is int:
        return f"an integer from {int(low)} to {int(high)}"
    return f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}]"


def validate(options: dict[str, Any]) -> dict[str, Any]:
    """Check every decoding option; return ``generate`` keyword arguments.

    Raises ``ValueError`` naming the parameter and its valid range, or ``TypeError`` for an unknown name.
    """
    unknown = set(options) - set(RANGES) - {"do_sample"}
    if unknown:
        raise TypeError(f"Unknown decoding option(s) {sorted(unknown)}; valid: {sorted([*RANGES, 'do_sample'])}")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name == "do_sample":
            if not isinstance(value, bool | int) or value not in (0, 1):
                raise ValueError(f"do_sample must be true or false, got {value!r}")
            out[name] = bool(value)
            continue
        kind, low, high, low_inclusive = RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be {_describe(name)}, got {value!r}")
        if kind is int and (not float(value).is_integer() if math.isfinite(value) else True):
            raise ValueError(f"{name} must be {_describe(name)}, got {value!r}")
        above_low = value >= low if low_inclusive else value > low
        if not math.isfinite(value) or not above_low or value > high:
            raise ValueError(f"{name} must be {_describe(name)}, got {value!r}")
        out[name] = int(value) if kind is int else float(value)
    out.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if out.get("min_new_tokens", 0) > out["max_new_tokens"]:
        raise ValueError(
            f"min_new_tokens ({out['min_new_tokens']}) must not exceed max_new_tokens ({out['max_new_tokens']})"
        )
    if out.get("do_sample") is False:
        # Sampling knobs mean nothing to greedy / beam search; dropping them keeps transformers quiet.
        out.pop("top_p", None)
        out.pop("temperature", None)
    return out
