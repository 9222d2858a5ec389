"""Argument checks shared by the layers: each bad value raises a ``ValueError`` naming it, the range and the fix."""

from __future__ import annotations

import math
from typing import Any, TypeGuard

__all__ = ["check_flags", "check_number", "is_int"]


def is_int(value: Any) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                 optional: bool = False, hint: str = "") -> None:
    """Raise a ValueError naming ``name``, ``value``, the range and ``hint`` unless ``value`` is a number in range.

    >>> check_number("sparsity", 1.5, 0.0, 1.0, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: sparsity must be in [0, 1), got 1.5
    """
    if value is None and optional:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = number and math.isfinite(value)  # an infinite lr or temperature is never meant, even where high is inf
    if finite and (low < value if low_open else low <= value) and (value < high if high_open else value <= high):
        return
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if high == math.inf:
        interval = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        interval = "in " + interval
    given = (repr(value) if finite or math.isnan(value) else f"{value!r}, not a finite number") if number else (
        f"{value!r}, a {type(value).__name__}: pass a number")
    raise ValueError(f"{name} must be {interval}{' or None' if optional else ''}, got {given}"
                     f"{'; ' + hint if hint else ''}")


def check_flags(**flags: Any) -> None:
    """Raise a ValueError naming the first of ``flags`` that is not ``True`` or ``False``."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
