"""Sparsity and threshold schedules: pure functions of training progress, with the cadence their updates follow."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Union

from .._checks import is_int
from ..registry import Registry
from .budget import UpdateBudget

__all__ = [
    "CallableSchedule",
    "Schedule",
    "ScheduleSpec",
    "ThresholdSchedule",
    "get_schedule",
    "list_schedules",
    "register_schedule",
]

Unit = Literal["epoch", "step"]


#: A schedule shape: ``(p, initial, final) -> value`` at ramp progress ``p`` in [0, 1] (0 at ``start``, 1 at ``end``).
Shape = Callable[[float, float, float], float]

_SHAPES: Registry[Shape] = Registry("schedule")


def register_schedule(name: str, *, override: bool = False) -> Callable[[Shape], Shape]:
    """Register a schedule shape ``(p, initial, final) -> value`` under ``name``; returns a decorator that returns
    the shape unchanged. ``Schedule(shape=name)`` then uses it.

    Raises:
        ValueError: ``name`` is registered already and ``override`` is False.

    Example:
        >>> @register_schedule("square_root")
        ... def square_root(p, initial, final):
        ...     return initial + (final - initial) * p ** 0.5
    """

    return _SHAPES.decorator(name, override=override)


#: The registered schedule shape names, sorted.
list_schedules = _SHAPES.names
#: The schedule shape registered under a name; an unknown name raises ``ValueError`` listing the registered ones.
get_schedule_shape = _SHAPES.get


def _towards(fraction: float, initial: float, final: float) -> float:
    return initial + (final - initial) * fraction


@register_schedule("cubic")
def cubic(p: float, initial: float = 0.0, final: float = 1.0) -> float:
    """Zhu & Gupta 2017 (https://arxiv.org/abs/1710.01878): ``s_t = s_f + (s_i - s_f)(1 - p)^3``."""
    return _towards(1.0 - (1.0 - p) ** 3, initial, final)


@register_schedule("linear")
def linear(p: float, initial: float, final: float) -> float:
    """``s_t = s_i + (s_f - s_i) p``: a constant rate."""
    return _towards(p, initial, final)


@register_schedule("cosine")
def cosine(p: float, initial: float, final: float) -> float:
    """A half cosine, ``s_i + (s_f - s_i)(1 - cos(pi p)) / 2``: slow at both ends."""
    return _towards((1.0 - math.cos(math.pi * p)) / 2.0, initial, final)


@register_schedule("constant")
def constant(p: float, initial: float, final: float) -> float:
    """``s_f`` from ``start`` on."""
    return final


@register_schedule("one_shot")
def one_shot(p: float, initial: float, final: float) -> float:
    """``s_i`` until ``end``, then ``s_f`` in one step."""
    return final if p >= 1.0 else initial


@register_schedule("exponential")
def exponential(p: float, initial: float, final: float) -> float:
    """The density ``1 - s`` falls geometrically: ``1 - s_t = (1 - s_i) ((1 - s_f) / (1 - s_i))^p``."""
    return 1.0 - (1.0 - initial) * ((1.0 - final) / (1.0 - initial)) ** p


Position = Union[int, float]

_EARLY_END = ("warn", "final")  # what a fit that ends before its ramp does at the end


@dataclass(frozen=True, kw_only=True)
class _Cadence:
    """When the keep-masks follow a schedule, and what a fit that ends before its ramp does (every schedule's
    keyword fields; :class:`~lightning_masks.lifecycle.plan.Plan` reads them).

    Args:
        update_every: when the keep-masks are updated (steps are optimizer steps, or batches in manual
            optimization, where Lightning's ``global_step`` counts every optimizer's steps): ``"auto"`` (every N
            steps, N a function of the fit's length and ramp only,
            :func:`~lightning_masks.lifecycle.plan.auto_interval`: about 100 updates over the ramp, as a finer ramp
            prunes better, benchmarks/results/study_cadence.md, but on a short fit few enough to keep updates near
            5% of its steps, counting an update as one step on a single example), ``"epoch"`` (as each epoch
            starts) or an int ``N`` (every N steps). Updates whose target equals the last one are skipped (nothing
            would change). A :class:`CallableSchedule` is called per epoch under ``"auto"``. Seeded runs repeat
            bit for bit.
        update_budget: opt-in, under ``"auto"``: the most that mask updates may take of the measured training
            time (e.g. 0.05): from the measured mean update and step times
            (:class:`~lightning_masks.lifecycle.budget.UpdateBudget`) the interval is widened where needed, rank zero
            deciding for all. The interval then depends on timings, so runs no longer repeat bit for bit; its
            decisions are saved in checkpoints and restored on resume. ``None`` (the default): no timing.
        early_end: a fit that ends before its ramp does (EarlyStopping, ``max_time``, an exception): ``"warn"``
            (the default) warns with the target and the sparsity reached and folds what was reached; ``"final"``
            makes one last update to the final target first (not after an exception).
    """

    update_every: Union[str, int] = "auto"
    update_budget: Optional[float] = None
    early_end: str = "warn"

    def __post_init__(self) -> None:
        every = self.update_every
        if every not in ("auto", "epoch") and not (is_int(every) and every > 0):
            raise ValueError(f"update_every must be 'auto', 'epoch' or a positive int (steps), got "
                             f"{self.update_every!r}")
        if self.update_budget is not None:
            UpdateBudget(self.update_budget)  # checks the share
        if self.early_end not in _EARLY_END:
            raise ValueError(f"early_end must be one of {list(_EARLY_END)}, got {self.early_end!r}")


@dataclass(frozen=True)
class Schedule(_Cadence):
    """Target sparsity as a function of training progress, and when the keep-masks follow it.

    Args:
        shape: one of :func:`list_schedules` (``cubic`` is Zhu & Gupta 2017).
        final: the final value; ``None`` takes the callback's ``sparsity``.
        initial: the value before ``start``.
        start, end: where the ramp begins and reaches ``final``. An ``int`` counts ``unit``\\ s
            (epochs or optimizer steps); a ``float`` is a fraction of the whole training run.
        unit: what an ``int`` start/end counts.
        update_every, update_budget, early_end: keyword-only, the cadence of the updates (see :class:`_Cadence`).

    ``constant`` holds ``final`` from ``start`` on; ``one_shot`` jumps to it at ``end``; ``exponential``
    lowers the density ``1 - s`` geometrically from ``1 - initial`` to ``1 - final``.
    """

    shape: str = "cubic"
    final: Optional[float] = None
    initial: float = 0.0
    start: Position = 0
    end: Position = 2 / 3
    unit: Unit = "epoch"

    def __post_init__(self) -> None:
        super().__post_init__()
        get_schedule_shape(self.shape)  # an unknown shape: the error lists the registered ones
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {self.unit!r}")
        for name in ("initial", "final"):
            value = getattr(self, name)
            if value is not None:
                self._check_value(name, value)
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 ({self.unit}s) or a float fraction in [0, 1], "
                                 f"got {value!r}")
            if isinstance(value, float) and value > 1:
                raise ValueError(f"{name}={value!r} is a float, read as a fraction of training, so it must be "
                                 f"in [0, 1]; pass an int to count {self.unit}s")

        if isinstance(self.start, type(self.end)) and isinstance(self.end, type(self.start)) and self.start > self.end:
            raise ValueError(f"the ramp is inverted: start={self.start!r} > end={self.end!r}; the target rises from "
                             f"start to end, so give start <= end (e.g. start={self.end!r}, end={self.start!r})")

    def _check_value(self, name: str, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} sparsity must be in [0, 1), got {value!r}; e.g. 0.9 prunes 90%")

    #: whether updates cut the gates at a threshold (``ThresholdSchedule``) rather than keep an exact count
    by_threshold: ClassVar[bool] = False
    #: whether the ramp can follow optimizer steps (``update_every="auto"``), not only epochs
    stepwise: ClassVar[bool] = True

    @property
    def uses_fractions(self) -> bool:
        """Whether ``start`` or ``end`` is a fraction of training (a bounded run is needed)."""
        return isinstance(self.start, float) or isinstance(self.end, float)

    def span(self, cadence: Unit, total: float, steps_per_epoch: float, every: int = 1) -> tuple[float, float]:
        """Return the ramp's ``(start, end)`` in the cadence's unit (epoch index or global step).

        Fractions are of ``total`` (epochs or steps, in the cadence's unit); an ``int`` in the other unit is
        converted with ``steps_per_epoch``. ``end`` is clamped to the last update point, ``total - 1`` rounded
        down to a multiple of ``every``, so the final value is always reached.
        """

        def convert(position: Position) -> float:
            if isinstance(position, float):
                return position * total
            if self.unit == cadence:
                return float(position)
            return position * steps_per_epoch if cadence == "step" else position / steps_per_epoch

        last = max(((total - 1) // every) * every, 0)
        return min(convert(self.start), last), min(convert(self.end), last)

    def with_final(self, final: float) -> "Schedule":
        """Return a copy whose ``final`` is set."""
        return dataclasses.replace(self, final=final)

    def value(self, t: float, start: float, end: float) -> float:
        """Return the target at position ``t``, with ``start``/``end`` resolved to the same unit as ``t``."""
        if self.final is None:
            raise ValueError("this schedule has no final value; call with_final() first")
        if t < start:
            return self.initial
        p = 1.0 if end <= start else min(max((t - start) / (end - start), 0.0), 1.0)
        return get_schedule_shape(self.shape)(p, self.initial, self.final)


@dataclass(frozen=True)
class ThresholdSchedule(Schedule):
    """A schedule of a threshold on the gate: entries whose gate is below it are pruned.

    The sparsity is then whatever the learnt gates give, not a fixed count.
    """

    final: Optional[float] = 0.5
    by_threshold: ClassVar[bool] = True

    def _check_value(self, name: str, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} gate threshold must be in [0, 1), got {value!r}; e.g. 0.5")


@dataclass(frozen=True)
class CallableSchedule(_Cadence):
    """Any callable ``t -> sparsity``, ``t`` the epoch index or global step (the callback's cadence); its keyword
    fields are the cadence of :class:`_Cadence`."""

    fn: Callable[[int], float]
    final: ClassVar[Optional[float]] = None  # unknown until called
    by_threshold: ClassVar[bool] = False
    stepwise: ClassVar[bool] = False  # called per epoch under update_every="auto"
    uses_fractions: ClassVar[bool] = False

    def span(self, cadence: Unit, total: float, steps_per_epoch: float, every: int = 1) -> tuple[float, float]:
        """No ramp: the callable maps positions to targets itself."""
        return 0.0, 0.0

    def value(self, t: float, start: float = 0, end: float = 0) -> float:
        target = float(self.fn(int(t)))
        if not 0.0 <= target < 1.0:
            raise ValueError(f"schedule callable {self.fn!r} returned {target!r} at t={t}; it must return a "
                             "sparsity in [0, 1)")
        return target


ScheduleSpec = Union[str, Schedule, Callable[[int], float]]


def get_schedule(spec: ScheduleSpec, final: float) -> Union[Schedule, CallableSchedule]:
    """Return a schedule from a shape name (with the default ramp and cadence), a :class:`Schedule`, or a callable.

    A :class:`Schedule` with ``final=None`` (and a named one) takes ``final``.
    """
    if isinstance(spec, str):
        return Schedule(shape=spec, final=final)
    if isinstance(spec, Schedule):
        return spec if spec.final is not None else spec.with_final(final)
    if isinstance(spec, CallableSchedule):
        return spec
    if callable(spec):
        return CallableSchedule(spec)
    raise TypeError(f"schedule must be a name in {list_schedules()}, a Schedule or a callable t -> sparsity, "
                    f"got {spec!r}")
