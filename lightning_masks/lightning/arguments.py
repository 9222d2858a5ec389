"""The callback's argument checks: each bad value raises at construction a ``ValueError`` naming it and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Optional, Union, overload

import torch

from ..lifecycle.plan import EARLY_END
from ..lifecycle.schedule import Schedule
from ..masking.gate import SCORE_DTYPES
from ..selection.selector import Selector

__all__ = ["FROZEN", "check_flags", "check_number", "check_output_layers", "check_settings", "check_targets",
           "final_sparsity", "is_int", "ramp_of", "score_dtype_of", "selector_of"]

#: what ``frozen`` may say of the tensors frozen at setup: left dense, binary masks (the kept weights kept bit for bit),
#: or soft gates (the kept weights scaled by their learned gate when folded)
FROZEN = ("skip", "mask", "gate")

#: ``start`` and ``end`` as the callback's signature defaults them: the Schedule's (a ramp over the first two thirds)
DEFAULT_RAMP = {"start": Schedule.start, "end": Schedule.end}

def is_int(value: Any) -> bool:
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
    if number and (low < value if low_open else low <= value) and (value < high if high_open else value <= high):
        return
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if high == math.inf:
        interval = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        interval = "in " + interval
    given = repr(value) if number else f"{value!r}, a {type(value).__name__}: pass a number"
    raise ValueError(f"{name} must be {interval}{' or None' if optional else ''}, got {given}"
                     f"{'; ' + hint if hint else ''}")


def check_settings(*, update_every: Any, temperature: Any, mask_lr: Any, mask_weight_decay: Any, early_end: Any,
                   seed: Any, log_every_n_steps: Any, frozen: Any = "skip") -> None:
    """Check the callback's settings (see :class:`~lightning_masks.MaskPruningCallback` for their meaning)."""
    if update_every not in ("auto", "epoch") and not (is_int(update_every) and update_every > 0):
        raise ValueError(f"update_every must be 'auto', 'epoch' or a positive int (steps), got {update_every!r}")
    check_number("temperature", temperature, 0.0, math.inf, low_open=True, hint="try 1.0 (lower is a harder gate)")
    for name, value in (("mask_lr", mask_lr), ("mask_weight_decay", mask_weight_decay)):
        check_number(name, value, 0.0, math.inf, optional=True, hint=f"e.g. {name}=0.01 (a float, not a string)")
    if early_end not in EARLY_END:
        raise ValueError(f"early_end must be one of {list(EARLY_END)}, got {early_end!r}")
    if frozen not in FROZEN:
        raise ValueError(f"frozen must be one of {list(FROZEN)}, got {frozen!r}: 'skip' leaves tensors frozen at "
                         "setup dense, 'mask' learns binary masks over them, 'gate' learns soft gates")
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if log_every_n_steps is not None and not (is_int(log_every_n_steps) and log_every_n_steps >= 0):
        raise ValueError(f"log_every_n_steps must be an int >= 0 or None, got {log_every_n_steps!r}; 0 logs "
                         "only as each epoch ends")


def final_sparsity(sparsity: Any, selector: Selector, default: float) -> float:
    """The fit's final sparsity: ``sparsity`` (in [0, 1)), or N:M's ``1 - N/M``, or ``default``."""
    if sparsity is not None:
        check_number("sparsity", sparsity, 0.0, 1.0, high_open=True, hint="e.g. sparsity=0.9 prunes 90%")
    fixed = selector.grain.sparsity
    if fixed is not None and sparsity is not None and not math.isclose(sparsity, fixed):
        raise ValueError(f"granularity {selector.granularity!r} fixes sparsity at {fixed}, got sparsity={sparsity}; "
                         "leave sparsity unset")
    return sparsity if sparsity is not None else (fixed if fixed is not None else default)


def ramp_of(schedule: Any, start: Any, end: Any) -> dict[str, Any]:
    """The ramp arguments of a named schedule (``unit="epoch"``); for a schedule object or callable, which carries
    its own, ``start``/``end`` off their defaults are refused rather than ignored."""
    if isinstance(schedule, str):
        return {"start": start, "end": end, "unit": "epoch"}
    given = {name: value for name, value in (("start", start), ("end", end)) if value != DEFAULT_RAMP[name]}
    if given:
        raise ValueError(f"start/end ({given}) only shape a named schedule; schedule={schedule!r} carries its own "
                         "ramp: put them in it (e.g. Schedule('cubic', final, start=..., end=..., unit='step')) or "
                         "pass the schedule by name")
    return {}


def check_flags(**flags: Any) -> None:
    """Raise a ValueError naming the first of ``flags`` that is not ``True`` or ``False``."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


@overload
def check_targets(name: str, value: Any, optional: Literal[False] = False) -> list: ...
@overload
def check_targets(name: str, value: Any, optional: bool) -> Optional[list]: ...


def check_targets(name: str, value: Any, optional: bool = False) -> Optional[list]:
    """A list of target specs from ``value``: one glob string is one glob, not its letters."""
    if value is None and optional:
        return None
    specs = [value] if isinstance(value, (str, type)) else value
    if isinstance(specs, Iterable) and not isinstance(specs, Mapping):
        specs = list(specs)
        if all(isinstance(spec, (str, type)) for spec in specs):
            return specs
    raise ValueError(f"{name} must be a glob on qualified names, a module type, or a list of them"
                     f"{' or None' if optional else ''}, got {value!r}; e.g. {name}=['encoder.*', torch.nn.Linear]")


def check_output_layers(value: Any) -> Union[str, list, None]:
    """``output_layers`` as the callback keeps it: ``"auto"``, ``None`` or a list of globs."""
    if isinstance(value, str) and value != "auto":
        raise ValueError(f"output_layers must be 'auto', None or a list of globs on module names, got {value!r}; "
                         "e.g. output_layers=['head']")
    return value if value in ("auto", None) else list(value)


def score_dtype_of(spec: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``score_dtype`` as a ``torch.dtype`` (or ``None``); raises ``ValueError`` naming the allowed values.

    >>> score_dtype_of("torch.bfloat16")
    torch.bfloat16
    """
    allowed = {str(d).removeprefix("torch."): d for d in SCORE_DTYPES}
    dtype = allowed.get(spec.removeprefix("torch."), spec) if isinstance(spec, str) else spec
    if dtype is not None and dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {sorted(allowed)}, a torch.dtype among them, or None (the "
                         f"weight's dtype), got {spec!r}")
    return dtype


def selector_of(selector: Optional[Selector]) -> Selector:
    """The selection: ``selector``, or ``Selector()`` when it is ``None``."""
    if selector is None:
        return Selector()
    if not isinstance(selector, Selector):
        raise ValueError(f"selector must be a lightning_masks.Selector (e.g. Selector(granularity='channel')), got "
                         f"{selector!r}")
    return selector

