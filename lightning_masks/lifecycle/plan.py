"""The lifecycle of one fit: when the keep-masks update, what each update targets, what a resume restores and what
an early end does. Pure decisions, testable without a Trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .budget import UpdateBudget
from .schedule import CallableSchedule, Schedule, Unit

__all__ = ["Plan", "UPDATE_COST_STEPS"]

_AUTO_UPDATES = 100  # mask updates spread over the ramp by update_every="auto" (a finer ramp prunes better)
MIN_RAMP_UPDATES = 2  # neither the cost model nor the update budget spaces updates wider than half the ramp
#: The cost of a mask update, in training steps, that the auto cadence plans for: an update costs about what one
#: training step on a single example costs (0.35-1.21x of it on the six models of benchmarks/real_sizes.py:
#: benchmarks/results/update_cost.md), and a step on a batch costs more.
UPDATE_COST_STEPS = 1.0
#: The share of a fit's steps that the auto cadence lets mask updates take, at :data:`UPDATE_COST_STEPS` a step.
UPDATE_SHARE = 0.05


def auto_interval(ramp: float, total: float) -> int:
    """The optimizer steps between mask updates under ``update_every="auto"``: about :data:`_AUTO_UPDATES` updates
    over a ramp of ``ramp`` steps, but no more than a fit of ``total`` steps affords, at :data:`UPDATE_COST_STEPS`
    a step an update, within :data:`UPDATE_SHARE` of it; never wider than 1 / :data:`MIN_RAMP_UPDATES` of the ramp.

    A function of the fit's configuration only (never of timings), so that seeded runs repeat bit for bit. With
    ``u = ramp / every`` updates the updates' share is ``u * UPDATE_COST_STEPS / total``.

    >>> auto_interval(20_000, 30_000)  # a long fine-tuning ramp: 100 updates
    200
    >>> auto_interval(30, 45)  # a short fit: updates 14 steps apart, 3 on the ramp
    14
    """
    if ramp <= 0:
        return 1
    fine = round(ramp / _AUTO_UPDATES)
    affordable = math.ceil(ramp * UPDATE_COST_STEPS / (UPDATE_SHARE * total) - 1e-9) if total > 0 else 1
    return max(1, min(max(fine, affordable), int(ramp) // MIN_RAMP_UPDATES))


@dataclass(frozen=True)
class Shortfall:
    """A fit that ended before its ramp did: where it stopped, the final target, and the target it reached."""

    position: Optional[float]
    ramp_end: float
    final: float
    reached: float
    unit: Unit
    threshold: bool = False

    def message(self, sparsity: float, action: str) -> str:
        stopped = "before its first mask update" if self.position is None else f"at {self.unit} {self.position:g}"
        goal = (f"gate threshold {self.final} (reached {self.reached:.4g}, sparsity {sparsity:.2%})" if self.threshold
                else f"sparsity {self.final} (reached {sparsity:.2%})")
        when = (f"before the ramp's end at {self.unit} {self.ramp_end:g}" if self.position is None or
                self.position < self.ramp_end else "with no update left to reach the final target")
        return f"lightning_masks: fit ended {stopped}, {when}: target {goal}; {action}"


@dataclass
class Plan:
    """When the keep-masks of one fit update, and what each update targets.

    Built at setup from the callback's schedule (:meth:`fresh` for each fit), given the fit's length by
    :meth:`resolve` as training starts, asked by the hooks :meth:`due` / :meth:`decide`, told each update by
    :meth:`record`. :meth:`state_dict` is what a checkpoint saves and a resume restores.

    Args:
        schedule: the sparsity (or gate-threshold) schedule, and its cadence: ``update_every`` (``"auto"``: every N
            optimizer steps, N from the fit's length and ramp, :func:`auto_interval`, per epoch for a callable
            schedule; ``"epoch"``; or ``N`` optimizer steps), ``early_end`` (a fit that ends before its ramp:
            ``"warn"``, fold what was reached and say so, or ``"final"``, one last update to the final target) and
            ``update_budget`` (opt-in, under ``"auto"`` with a step cadence: the most that mask updates may take of
            the measured training time, :class:`~lightning_masks.lifecycle.budget.UpdateBudget`: :meth:`account` is
            told each step's and update's seconds, and the interval widens, from the step it widens at, its
            ``anchor``, where the measured costs need it; its decisions depend on timings and are saved in the
            checkpoint and restored on resume).
        regrow: pruned entries may come back, so an update whose target equals the last one still runs.

    Example:
        >>> plan = Plan(Schedule("linear", final=0.5, end=3))
        >>> plan.resolve(total_steps=16, steps_per_epoch=4)  # 4 epochs of 4 steps: the ramp is steps 0..12
        >>> plan.every, plan.span  # a short fit: an update every 6 steps (auto_interval)
        (6, (0, 12))
        >>> plan.decide(plan.due(epoch=1, step=6, epoch_start=False))
        0.25
    """

    schedule: Union[Schedule, CallableSchedule]
    regrow: bool = False
    # resolved from the fit's length (resolve)
    every: int = 1
    ramp: tuple[float, float] = (0.0, 0.0)  # the schedule's (start, end) in the cadence's unit
    span: tuple[float, float] = (0.0, 0.0)  # the same, its end clamped to the last update point
    base_every: int = 1  # the auto cadence's interval before the budget widens it
    planned: Optional[tuple] = None  # what the cadence was planned for (ramp, length); a resume of another keeps none
    anchor: int = 0  # updates fall on steps anchor + k * every (the budget moves the anchor when it widens)
    total: float = 0.0  # this fit's length in optimizer steps
    steps_per_epoch: float = 1.0
    budget: Optional[UpdateBudget] = None
    # state: the last update, and every update so far (checkpointed)
    position: Optional[float] = None
    target: float = 0.0
    pruned: int = 0
    threshold: Optional[float] = None
    history: dict[str, list] = field(default_factory=lambda: {"layers": [], "positions": [], "sparsity": []})

    def __post_init__(self) -> None:
        if isinstance(self.update_every, int):
            self.every = self.update_every
        if self.schedule.update_budget is not None and self.budget is None:
            self.budget = UpdateBudget(self.schedule.update_budget)

    @property
    def update_every(self) -> Union[str, int]:
        """The schedule's ``update_every``."""
        return self.schedule.update_every

    @property
    def budgeted(self) -> bool:
        """Whether the update budget applies: ``"auto"`` with a step cadence and a budget set."""
        return self.budget is not None and self.update_every == "auto" and self.cadence == "step"

    @property
    def cadence(self) -> Unit:
        """``"epoch"``: updates as epochs start (position = epoch index); ``"step"``: at optimizer steps."""
        if self.update_every == "epoch" or (self.update_every == "auto" and not self.schedule.stepwise):
            return "epoch"
        return "step"

    @property
    def by_threshold(self) -> bool:
        """Whether updates cut the gates at a threshold (rather than keeping an exact count)."""
        return self.schedule.by_threshold

    def fresh(self) -> "Plan":
        """Return this plan with a new lifecycle: no update yet, empty history (a new fit)."""
        return Plan(self.schedule, self.regrow)

    def resolve(self, total_steps: float, steps_per_epoch: float) -> None:
        """Fit the ramp to this fit's length: the update cadence behind ``"auto"`` and the span in its unit.

        A resumed fit keeps the update budget's widened interval only when it continues the ramp it was planned
        for (same final target, span and length); a fit continued with another ramp (a higher target, more
        epochs) plans its cadence afresh.

        Raises:
            ValueError: the ramp's start, resolved in this fit, falls after its end.
        """
        total = total_steps if self.cadence == "step" else math.ceil(total_steps / steps_per_epoch)
        self.total, self.steps_per_epoch = total, steps_per_epoch
        self.ramp = start, end = self.schedule.span(self.cadence, total, steps_per_epoch)
        planned = (self.final, start, end, total)
        if self.planned is not None and self.planned != planned:  # continued with another ramp: re-plan
            self.every, self.anchor = self.update_every if isinstance(self.update_every, int) else 1, 0
            if self.budget is not None:
                self.budget = UpdateBudget(self.budget.share)
        self.planned = planned
        if self.update_every == "auto" and self.cadence == "step":
            self.base_every = auto_interval(end - start, total)
            self.every = max(self.base_every, self.every if self.anchor else 1)  # a resume keeps a widened interval
        if start > end:
            assert isinstance(self.schedule, Schedule)  # a callable schedule's span is (0, 0)
            raise ValueError(f"the schedule's ramp is inverted in this fit: start={self.schedule.start!r} is "
                             f"{self.cadence} {start:g}, after end={self.schedule.end!r} at {self.cadence} "
                             f"{end:g}; give start <= end")
        self.span = self.schedule.span(self.cadence, total, steps_per_epoch, self.every)
        if self.anchor:  # resumed after the budget widened the interval from step `anchor` on
            self._end_on_grid()

    def _end_on_grid(self) -> None:
        """Clamp the ramp's end to the last update point of the grid ``anchor + k * every`` within the fit."""
        last = int(self.total - 1)
        end = self.ramp[1]
        grid_end = self.anchor + (last - self.anchor) // self.every * self.every
        self.span = (self.span[0], min(end, grid_end) if grid_end >= self.span[0] else end)

    def wanted_interval(self, step: int) -> int:
        """The interval the budget asks for at ``step`` (the base interval until it has measured enough)."""
        if not self.budgeted:
            return self.every
        assert self.budget is not None  # budgeted
        return self.budget.interval(self.base_every, self.total, step)

    def account(self, step_seconds: Optional[float], update_seconds: Optional[float]) -> bool:
        """Tell the budget the seconds of the step just ended (``None``: not timed) and of the update just made
        (``None``: none was made); return whether to decide the interval again (:meth:`wanted_interval`): after
        an update, or as the step estimate settles. An update to target 0 prunes nothing: spent, not used for the
        estimate."""
        if not self.budgeted:
            return False
        budget = self.budget
        assert budget is not None  # budgeted
        settled = False
        if step_seconds is not None:
            budget.add_step(step_seconds)
            settled = budget.settling()
        if update_seconds is not None:
            budget.add_update(update_seconds, measured=self.target > 0)
        return settled or update_seconds is not None

    def widen(self, step: int, wanted: int) -> None:
        """Set the interval from ``step`` on to ``wanted`` (at least the base one) on a grid through the ramp's end,
        so the final target still arrives there (never later), at most 1 / :data:`MIN_RAMP_UPDATES` of the ramp
        apart: on a short fit of a small model the budget alone would turn the ramp into one late jump."""
        every = max(self.base_every, wanted)
        start, end = self.ramp[0], math.ceil(self.ramp[1])
        if step < end:  # the ramp goes on
            every = max(1, min(every, int(end - start) // MIN_RAMP_UPDATES))
        if every != self.every:
            self.every, self.anchor = every, end if step < end else step
            self._end_on_grid()

    def due(self, epoch: int, step: int, epoch_start: bool) -> Optional[int]:
        """Return the position of the update due at this point (an epoch's start, or a batch's), or ``None``."""
        if self.cadence == "epoch":
            t = epoch if epoch_start else None
        else:
            t = step if not epoch_start and (step - self.anchor) % self.every == 0 else None
        return None if t == self.position else t

    def decide(self, t: Optional[int]) -> Optional[float]:
        """Return the target of the update at position ``t``, or ``None`` when it is skipped.

        An update is skipped when ``t`` is ``None`` or when its target equals the last one with no regrowth
        and a count schedule: nothing would change (the position still moves on).
        """
        if t is None:
            return None
        target = self.schedule.value(t, *self.span)
        if self.position is not None and target == self.target and not self.regrow and not self.by_threshold:
            self.position = t
            return None
        return target

    def record(self, t: float, target: float, pruned: int, threshold: Optional[float],
               layers: list[str], sparsity: list[float]) -> None:
        """Remember the update at ``t``: its target, what it pruned and the per-layer sparsity."""
        self.position, self.target, self.pruned, self.threshold = t, target, pruned, threshold
        self.history["layers"] = list(layers)
        self.history["positions"].append(t)
        self.history["sparsity"].append(list(sparsity))

    @property
    def final(self) -> Optional[float]:
        """The ramp's final target, or ``None`` when unknown (a callable schedule)."""
        return self.schedule.final

    def shortfall(self) -> Optional[Shortfall]:
        """Return how the fit fell short of its ramp when it ended with a target below the final one (it ended
        early, or its updates stalled), else ``None``."""
        final = self.final
        if final is None or (self.position is not None and self.target >= final - 1e-9):  # a shape's rounding
            return None
        return Shortfall(self.position, self.span[1], final, self.target, self.cadence, self.by_threshold)

    def end_target(self) -> Optional[float]:
        """The target of one last update when the fit ends short of its ramp, or ``None`` (keep what was reached)."""
        shortfall = self.shortfall()
        return shortfall.final if shortfall is not None and self.schedule.early_end == "final" else None

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "target": self.target, "pruned": self.pruned,
                "threshold": self.threshold, "history": self.history, "update_every": self.every,
                "update_anchor": self.anchor, "budget": self.budget.state_dict() if self.budget else None,
                "planned": self.planned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the lifecycle of a checkpointed fit (the cadence and span are resolved again from the fit)."""
        self.position, self.target, self.pruned = state["position"], state["target"], state["pruned"]
        self.threshold = state.get("threshold")
        self.history = state.get("history") or {"layers": [], "positions": [], "sparsity": []}
        if state.get("budget") and self.budget is not None:  # the measured costs and the widened interval
            self.budget = UpdateBudget(**{**state["budget"], "share": self.budget.share})
            self.every, self.anchor = state.get("update_every", self.every), state.get("update_anchor", 0)
            self.planned = state.get("planned")
