"""lightning_masks: prune any LightningModule with learnable, weight-dependent masks."""

from .callback import MaskPruningCallback
from .export import fold_checkpoint, fold_state_dict
from .init import Initializer, get_initializer, list_initializers, register_initializer
from .masks import MaskGate, attach, fold, masked_tensors
from .schedule import Schedule, ThresholdSchedule, list_schedules
from .select import Selector

__all__ = [
    "Initializer",
    "MaskGate",
    "MaskPruningCallback",
    "Schedule",
    "Selector",
    "ThresholdSchedule",
    "attach",
    "fold",
    "fold_checkpoint",
    "fold_state_dict",
    "get_initializer",
    "list_initializers",
    "list_schedules",
    "masked_tensors",
    "register_initializer",
]

__version__ = "0.1.0"
