"""The callback's argument checks: each bad value raises at construction a ``ValueError`` naming it and the fix."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Optional, TypeVar, Union, cast, overload

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .._checks import check_number, is_int
from ..selection import Selector

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py

#: what ``frozen`` may say of the tensors frozen at setup: left dense, binary masks (the kept weights kept bit for bit),
#: or soft gates (the kept weights scaled by their learned gate when folded)
_FROZEN = ("skip", "mask", "gate")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: prefixes a strategy object's field may carry when passed to the callback flat (``mask_lr``: ``MaskOptimizer.lr``)
_FLAT_PREFIXES = ("", "mask_", "log_")


def refuse_flat_fields(strategies: Mapping[str, type]) -> Callable[[F], F]:
    """Wrap ``__init__`` so that an unknown keyword raises a ``TypeError`` naming the fix before anything is built.

    ``strategies`` maps each argument that takes a strategy object to its class (``{"optimizer": MaskOptimizer}``).
    A keyword that is one of their fields, bare or with a prefix of ``_FLAT_PREFIXES`` (``end=0.5``,
    ``mask_lr=0.01``), is refused naming the object that takes it (``optimizer=MaskOptimizer(lr=0.01)``); any other
    unknown keyword is refused listing the arguments. The wrapped signature is ``__init__``'s own.
    """
    def wrap(init: F) -> F:
        accepted = [name for name in inspect.signature(init).parameters if name != "self"]

        @functools.wraps(init)
        def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
            for name, value in kwargs.items():
                if name not in accepted:
                    raise TypeError(flat_field_message(type(self).__name__, name, value, strategies, accepted))
            return init(self, *args, **kwargs)

        return cast(F, checked)

    return wrap


def flat_field_home(name: str, strategies: Mapping[str, type]) -> Optional[tuple[str, str]]:
    """The ``(argument, field)`` that a keyword passed flat belongs to (``mask_lr``: ``("optimizer", "lr")``), bare
    or with a prefix of ``_FLAT_PREFIXES``; ``None`` when it is no strategy object's field."""
    for argument, kind in strategies.items():
        fields = inspect.signature(kind).parameters
        for prefix in _FLAT_PREFIXES:
            field = name[len(prefix):]
            if name.startswith(prefix) and field in fields:
                return argument, field
    return None


def flat_field_message(owner: str, name: str, value: Any, strategies: Mapping[str, type], accepted: list) -> str:
    """Why ``name=value`` is refused by ``owner``, and what to pass instead."""
    home = flat_field_home(name, strategies)
    if home:
        argument, field = home
        kind = strategies[argument].__name__
        return f"{owner} got {name}={value!r}, a field of {kind}: pass {argument}={kind}({field}={value!r})"
    return f"{owner} got an unexpected keyword argument {name}={value!r}; its arguments are {accepted}"


def refuse_misplaced(name: str, value: Any, strategies: Mapping[str, type]) -> None:
    """Raise a ``ValueError`` when ``value``, given for argument ``name``, is the strategy object of another argument
    (a ``Selector`` is callable, so ``schedule=Selector()`` would otherwise be taken as a schedule)."""
    for argument, kind in strategies.items():
        if argument != name and isinstance(value, kind):
            raise ValueError(f"{name} got a {kind.__name__}, which is the {argument} argument's object: pass "
                             f"{argument}={value!r}")


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


def check_relaxed_schedule(selector: Selector, schedule: Any) -> None:
    """A relaxation samples whole N:M patterns from the first step: refuse a schedule that ramps towards them."""
    if selector.relaxation is None:
        return
    shape, start = getattr(schedule, "shape", None), getattr(schedule, "start", None)
    if shape != "constant" or start != 0 or getattr(schedule, "by_threshold", False):
        raise ValueError(f"relaxation={selector.relaxation!r} samples whole {selector.granularity} patterns from "
                         f"the first step, so the keep-masks must be {selector.granularity} from it too, but the "
                         f"schedule is {schedule!r}: pass schedule=Schedule('constant', start=0, update_every=10)")


def warn_relaxed_gates(selector: Selector, frozen: str) -> None:
    """A relaxation's masks are binary: ``frozen="gate"`` (soft gates that scale the kept weights) does not apply."""
    if selector.relaxation is not None and frozen == "gate":
        rank_zero_warn("lightning_masks: frozen='gate' learns soft gates that scale the kept weights, but under "
                       f"relaxation={selector.relaxation!r} the masks are binary (w * keep, the kept weights bit for "
                       "bit): the frozen tensors get binary masks, as with frozen='mask'; pass frozen='mask' to say so")


def check_relaxed_init(selector: Selector, initializer: Any) -> None:
    """A relaxation learns each group's pattern: refuse an initializer that holds its mask for the whole fit."""
    if selector.relaxation is not None and getattr(initializer, "fixed", False):
        raise ValueError(f"init={initializer!r} holds its mask for the whole fit, but relaxation="
                         f"{selector.relaxation!r} learns each group's pattern (and its training forward would sample "
                         "patterns the held mask does not have): pass init='from_zeros' (fixed=False) to start from "
                         "that mask as the relaxation's prior, or drop the relaxation to hold it")


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
    if value == "auto" or value is None:
        return value
    globs = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, Mapping)) else None
    if globs is None or not all(isinstance(glob, str) for glob in globs):
        raise ValueError(f"output_layers must be 'auto', None or a list of globs on module names, got {value!r}; "
                         "e.g. output_layers=['head']")
    return globs
