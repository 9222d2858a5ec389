"""lightning_masks: prune any LightningModule with learnable, weight-dependent masks."""

from .export.checkpoints import fold_checkpoint, fold_state_dict
from .lifecycle.schedule import CallableSchedule, Schedule, ThresholdSchedule, list_schedules, register_schedule
from .lightning.callback import MaskPruningCallback
from .lightning.fit_report import MaskLogging
from .lightning.optim import MaskOptimizer
from .lightning.sharding import full_state_dict, mask_before_sharding
from .masking.gate import MaskGate
from .masking.hiding import masks_hidden
from .masking.initializers import Initializer, get_initializer, list_initializers, register_initializer
from .masking.kinds import LayerKind, get_layer_kind, list_layer_kinds, register_layer_kind
from .masking.masks import attach, fold, masked_tensors
from .masking.plain import folded_state, plain_state_dict
from .masking.state import MaskState
from .selection.importance import list_importances, register_importance
from .selection.selector import Selector

__all__ = [
    "CallableSchedule",
    "Initializer",
    "LayerKind",
    "MaskGate",
    "MaskLogging",
    "MaskOptimizer",
    "MaskPruningCallback",
    "MaskState",
    "Schedule",
    "Selector",
    "ThresholdSchedule",
    "attach",
    "fold",
    "fold_checkpoint",
    "fold_state_dict",
    "full_state_dict",
    "folded_state",
    "get_initializer",
    "get_layer_kind",
    "list_importances",
    "list_initializers",
    "list_layer_kinds",
    "list_schedules",
    "mask_before_sharding",
    "masked_tensors",
    "masks_hidden",
    "plain_state_dict",
    "register_importance",
    "register_initializer",
    "register_layer_kind",
    "register_schedule",
]

__version__ = "0.1.0"
