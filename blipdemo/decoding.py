"""Decoding options: validated before any model work, then handed to transformers' ``generate``.

Options the caller does not give keep the checkpoint's own ``generation_config`` values (what the
transformers reference uses too), except ``max_new_tokens``, which defaults to 256.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
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
    "seed": (int, 0, 2**63 - 1, True),
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


@dataclass(frozen=True)
class DecodingOptions:
    """Validated decoding options of one request (None: the checkpoint's ``generation_config`` value).

    Build it with ``DecodingOptions.of(...)``, which checks every value (see ``validate``); the app's controls, the
    API and the library share it, and it pickles (ZeroGPU hands it to a forked worker).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int | None = None
    num_beams: int | None = None
    do_sample: bool | None = None
    top_p: float | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    seed: int | None = None  # sampling: the row's own generator, so its answer is reproducible in any batch

    @classmethod
    def of(cls, options: DecodingOptions | dict | None = None, **more: Any) -> DecodingOptions:
        """Options from a dict and/or keywords (or an existing instance), validated: ValueError / TypeError naming
        the parameter and its range."""
        given = options.kwargs() if isinstance(options, DecodingOptions) else dict(options or {})
        return cls(**validate({**given, **more}))

    def kwargs(self) -> dict[str, Any]:
        """The options set, as ``generate`` keyword arguments."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def resolved(self, generation_config) -> dict[str, Any]:
        """Every option with the checkpoint's default where this request gave none."""
        return {
            f.name: getattr(self, f.name)
            if getattr(self, f.name) is not None
            else getattr(generation_config, f.name, None)
            for f in fields(self)
        }

    def decodes_alone(self, generation_config) -> bool:
        """Whether this request decodes alone, through ``generate`` (beam search), instead of in the running batch.

        Everything else — greedy and sampling, any temperature, top-p, repetition penalty, lengths or seed — shares
        the batch, each row with its own logits processors. A seed steers sampling rows only: a beam search that
        samples draws from torch's global generator, as ``generate`` does."""
        return (self.resolved(generation_config)["num_beams"] or 1) > 1
