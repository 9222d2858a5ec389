"""How far apart mask updates must be for their measured cost to stay within a share of the training time.

Pure bookkeeping (no Lightning): the callback reports the seconds of each training step and of each mask update,
and asks for the update interval. Issue 17: on short fits of small models an update costs several steps, and an
update every step or two made the whole fit 1.65-4.3x the dense one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_UPDATE_SHARE", "UpdateBudget"]

#: The share of a fit's training time that mask updates may take under ``update_every="auto"``.
DEFAULT_UPDATE_SHARE = 0.05


@dataclass
class UpdateBudget:
    """Keep mask updates within ``share`` of the training time, from measured costs.

    With updates of mean cost ``U`` seconds every ``N`` steps of mean cost ``S``, updates take
    ``U / (U + N * S)`` of the time, at most ``share`` when ``N >= U * (1 - share) / (share * S)``.

    Args:
        share: in (0, 1): the most that updates may take of the training time (steps plus updates).
        update_seconds, updates: total time (seconds) and count of the measured updates.
        step_seconds, steps: total time (seconds) and count of the measured training steps (updates excluded).

    Raises:
        ValueError: ``share`` outside (0, 1).

    Example:
        >>> budget = UpdateBudget(0.05)
        >>> budget.add_step(0.010); budget.add_step(0.010); budget.add_update(0.004)
        >>> budget.interval(1)  # 4 ms updates against 10 ms steps: every 8 steps
        8
    """

    share: float = DEFAULT_UPDATE_SHARE
    update_seconds: float = 0.0
    updates: int = 0
    step_seconds: float = 0.0
    steps: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"the update budget must be a share of the training time in (0, 1), got {self.share!r}; "
                             "e.g. 0.05, or None for no budget")

    def add_step(self, seconds: float) -> None:
        """Count one training step that took ``seconds`` (wall time, the mask update excluded)."""
        self.step_seconds += seconds
        self.steps += 1

    def add_update(self, seconds: float) -> None:
        """Count one mask update that took ``seconds``."""
        self.update_seconds += seconds
        self.updates += 1

    def interval(self, base: int) -> int:
        """The update interval in steps: ``base``, or more where the measured costs need it (``base`` until both
        a step and an update have been measured)."""
        if not (self.updates and self.steps and self.step_seconds > 0):
            return base
        update, step = self.update_seconds / self.updates, self.step_seconds / self.steps
        needed = update * (1.0 - self.share) / (self.share * step)
        return max(base, math.ceil(needed - 1e-9))

    def state_dict(self) -> dict:
        """Plain values, for the checkpoint."""
        return {"share": self.share, "update_seconds": self.update_seconds, "updates": self.updates,
                "step_seconds": self.step_seconds, "steps": self.steps}
