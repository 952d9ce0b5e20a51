"""One range check for the numbers in config dataclasses (models here, training in reco.train):
a NaN, an inf or a zero head count must fail at the config, not as a ZeroDivisionError or a run
that trains to NaN."""

from __future__ import annotations

import math
import numbers
from typing import Any


def _bounds(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    lo = f"> {gt:g}" if gt is not None else (f">= {ge:g}" if ge is not None else "")
    hi = f"< {lt:g}" if lt is not None else (f"<= {le:g}" if le is not None else "")
    if lo and hi:
        left = "(" if gt is not None else "["
        right = ")" if lt is not None else "]"
        return f"in {left}{lo.split()[1]}, {hi.split()[1]}{right}"
    return lo or hi


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    optional: bool = False,
) -> None:
    """Raises unless value is a finite number (an int if integer; None too if optional) within
    the bounds: TypeError for a non-number (bools are not numbers), ValueError otherwise. The
    message starts with name ("lr must be a finite number > 0, got nan"), so that a config
    loader can put the section's dotted path in front of it."""
    if optional and value is None:
        return
    kind = "an integer" if integer else "a finite number"
    want = f"{kind} {_bounds(gt, ge, lt, le)}".rstrip() + (" or None" if optional else "")
    numeric = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise TypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not (
        (gt is None or value > gt)
        and (ge is None or value >= ge)
        and (lt is None or value < lt)
        and (le is None or value <= le)
    ):
        raise ValueError(f"{name} must be {want}, got {value!r}")
