"""The callback's argument checks: each bad value raises at construction a ``ValueError`` naming it and the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Optional, TypeVar, Union, overload

from .._checks import check_number, is_int
from ..selection import Selector

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py

#: what ``frozen`` may say of the tensors frozen at setup: left dense, binary masks (the kept weights kept bit for bit),
#: or soft gates (the kept weights scaled by their learned gate when folded)
_FROZEN = ("skip", "mask", "gate")

T = TypeVar("T")


def check_settings(*, frozen: Any, seed: Any) -> None:
    """Check the callback's plain settings (see :class:`~lightning_masks.MaskPruningCallback` for their meaning)."""
    if frozen not in _FROZEN:
        raise ValueError(f"frozen must be one of {list(_FROZEN)}, got {frozen!r}: 'skip' leaves tensors frozen at "
                         "setup dense, 'mask' learns binary masks over them, 'gate' learns soft gates")
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed must be an int or None, got {seed!r}")


def instance_of(name: str, value: Optional[T], kind: type[T], example: str) -> T:
    """The strategy object ``value`` given for argument ``name``, or ``kind()`` when it is ``None``; anything else
    raises a ``ValueError`` naming the class and an ``example``."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a lightning_masks.{kind.__name__} (e.g. {name}={example}), got {value!r}")
    return value


def final_sparsity(sparsity: Any, selector: Selector, default: float) -> float:
    """The fit's final sparsity: ``sparsity`` (in [0, 1)), or N:M's ``1 - N/M``, or ``default``."""
    if sparsity is not None:
        check_number("sparsity", sparsity, 0.0, 1.0, high_open=True, hint="e.g. sparsity=0.9 prunes 90%")
    fixed = selector.grain.sparsity
    if fixed is not None and sparsity is not None and not math.isclose(sparsity, fixed):
        raise ValueError(f"granularity {selector.granularity!r} fixes sparsity at {fixed}, got sparsity={sparsity}; "
                         "leave sparsity unset")
    return sparsity if sparsity is not None else (fixed if fixed is not None else default)


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
