"""When the keep bits update and to what: schedules, the update budget and the per-fit Plan. Numbers only.

This is the face the other layers import; what is not listed here is the layer's own."""

from .plan import UPDATE_COST_STEPS, Plan
from .schedule import (
    CallableSchedule,
    Schedule,
    ScheduleSpec,
    ThresholdSchedule,
    get_schedule,
    list_schedules,
    register_schedule,
)

__all__ = [
    "CallableSchedule",
    "Plan",
    "Schedule",
    "ScheduleSpec",
    "ThresholdSchedule",
    "UPDATE_COST_STEPS",
    "get_schedule",
    "list_schedules",
    "register_schedule",
]
