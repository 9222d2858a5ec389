"""lightning_masks: prune any LightningModule with learnable, weight-dependent masks."""

from .export import fold_checkpoint, fold_state_dict
from .lifecycle import CallableSchedule, Schedule, ThresholdSchedule, list_schedules, register_schedule
from .lightning import MaskLogging, MaskOptimizer, MaskPruningCallback, full_state_dict, mask_before_sharding
from .masking import (
    GumbelPatterns,
    Initializer,
    LayerKind,
    MaskGate,
    MaskState,
    attach,
    fold,
    folded_state,
    get_initializer,
    get_layer_kind,
    list_initializers,
    list_layer_kinds,
    masked_tensors,
    masks_hidden,
    plain_state_dict,
    register_initializer,
    register_layer_kind,
)
from .selection import Selector, list_importances, register_importance

__all__ = [
    # the callback and the strategy objects it composes
    "MaskPruningCallback",
    "Initializer",
    "Schedule",
    "ThresholdSchedule",
    "CallableSchedule",
    "Selector",
    "GumbelPatterns",
    "MaskState",
    "MaskOptimizer",
    "MaskLogging",
    # registries: initializers, schedule shapes, importance criteria, layer kinds
    "get_initializer",
    "list_initializers",
    "register_initializer",
    "list_schedules",
    "register_schedule",
    "list_importances",
    "register_importance",
    "LayerKind",
    "get_layer_kind",
    "list_layer_kinds",
    "register_layer_kind",
    # masks on any nn.Module, without Lightning
    "attach",
    "fold",
    "masked_tensors",
    "masks_hidden",
    "MaskGate",
    # plain weights and checkpoints
    "plain_state_dict",
    "folded_state",
    "fold_checkpoint",
    "fold_state_dict",
    # sharded training (FSDP2)
    "mask_before_sharding",
    "full_state_dict",
]

__version__ = "0.1.0"
