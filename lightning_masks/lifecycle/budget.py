"""How far apart mask updates must be for their measured cost to stay within a share of the training time.

Pure bookkeeping (no Lightning): the callback reports the seconds of each training step and of each mask update,
and asks for the update interval: on short fits of small models an update costs several steps, and an update every
step or two made the whole fit 1.65-4.3x the dense one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py

#: The share of a fit's training time that mask updates may take under ``update_every="auto"``.
_DEFAULT_UPDATE_SHARE = 0.05
#: The part of the share that is planned for: updates cost more or less than those so far (late in the ramp of a
#: 50-step fit of a tiny GPT-2 they cost twice the first ones; planning for 80% of the share spent 5.4-5.7% there),
#: so the interval aims at 60% of the share.
_PLANNED = 0.6


@dataclass
class UpdateBudget:
    """Keep mask updates within ``share`` of the training time, from measured costs.

    With updates of cost ``U`` seconds every ``N`` steps of mean cost ``S``, updates take
    ``U / (U + N * S)`` of the time, at most ``p`` when ``N >= U * (1 - p) / (p * S)``. In a fit of known length
    (``total`` steps, ``done`` of them done) the updates already made count against the budget: the
    ``p / (1 - p) * total * S`` seconds the whole fit's updates may take, less the ``spent`` ones, buy
    ``allowed`` more updates of ``U``, spread over the ``total - done`` steps left. ``p`` is
    ``_PLANNED * share``, and ``U`` the larger of the measured updates' mean and the latest one: margins for updates
    that cost more than those so far (on small models an update late in the ramp cost up to twice an early one).
    ``S`` leaves out the first measured step once a second one is in: it carries the fit's one-off costs (memory
    allocation, kernel choice, the loader's start; 15-22 ms against 7-13 ms for the later steps of a tiny BERT),
    which made a short fit plan for twice the updates it could afford.

    Args:
        share: in (0, 1): the most that updates may take of the training time (steps plus updates).
        update_seconds, updates, latest_seconds: total time (seconds), count and the latest of the updates
            measured for ``U``.
        spent_seconds: time of every update made so far, the unmeasured ones (the first, with its one-off costs)
            included.
        step_seconds, steps: total time (seconds) and count of the measured training steps (updates excluded).
        first_step_seconds: the first measured step's time (included in ``step_seconds``).

    Raises:
        ValueError: ``share`` outside (0, 1).

    Example:
        >>> budget = UpdateBudget(0.05)
        >>> budget.add_step(0.010); budget.add_step(0.010); budget.add_update(0.004)
        >>> budget.interval(1)  # 4 ms updates against 10 ms steps, planning for 3%: every 13 steps
        13
        >>> budget.interval(1, total=1000, done=2)  # the fit's updates may take 309 ms: 76 more of 4 ms in 998 steps
        14
        >>> budget.add_update(0.196, measured=False)  # 200 ms spent: 27 more updates
        >>> budget.interval(1, total=1000, done=2)
        37
    """

    share: float = _DEFAULT_UPDATE_SHARE
    update_seconds: float = 0.0
    updates: int = 0
    latest_seconds: float = 0.0
    spent_seconds: float = 0.0
    step_seconds: float = 0.0
    steps: int = 0
    first_step_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"the update budget must be a share of the training time in (0, 1), got {self.share!r}; "
                             "e.g. 0.05, or None for no budget")

    def add_step(self, seconds: float) -> None:
        """Count one training step that took ``seconds`` (wall time, the mask update excluded)."""
        if not self.steps:
            self.first_step_seconds = seconds
        self.step_seconds += seconds
        self.steps += 1

    def add_update(self, seconds: float, measured: bool = True) -> None:
        """Count one mask update that took ``seconds``; ``measured=False`` spends it without using it for the mean
        (an update with one-off costs)."""
        self.spent_seconds += seconds
        if measured:
            self.update_seconds += seconds
            self.updates += 1
            self.latest_seconds = seconds

    def interval(self, base: int, total: float = math.inf, done: int = 0) -> int:
        """The update interval in steps: ``base``, or more where the measured costs need it (``base`` until both
        a step and an update have been measured). With the fit's ``total`` steps (``done`` of them done), the
        interval that spends what is left of the whole fit's budget over the steps left."""
        if not (self.updates and self.steps and self.step_seconds > 0):
            return base
        update = max(self.update_seconds / self.updates, self.latest_seconds)
        step = self.step_seconds / self.steps if self.steps == 1 else \
            (self.step_seconds - self.first_step_seconds) / (self.steps - 1)
        planned = _PLANNED * self.share
        ratio = planned / (1.0 - planned)
        if math.isfinite(total):
            allowed = (ratio * total * step - self.spent_seconds) / update
            needed = (total - done) / allowed if allowed > 0 else math.inf
        else:
            needed = update / (ratio * step)
        return base if needed <= base else (math.ceil(needed - 1e-9) if math.isfinite(needed) else 2 ** 62)

    def settling(self) -> bool:
        """Whether the step estimate just moved enough to decide the interval again: at the 2nd, 4th, 8th, ...
        measured step (the first leaves the estimate at the second; a few decisions in all, each a broadcast
        under DDP)."""
        return self.steps >= 2 and self.steps & (self.steps - 1) == 0

    def state_dict(self) -> dict:
        """Plain values, for the checkpoint."""
        return {"share": self.share, "update_seconds": self.update_seconds, "updates": self.updates,
                "latest_seconds": self.latest_seconds,
                "spent_seconds": self.spent_seconds, "step_seconds": self.step_seconds, "steps": self.steps,
                "first_step_seconds": self.first_step_seconds}
