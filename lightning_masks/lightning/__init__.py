"""The Lightning glue: the callback, its argument checks, the optimizer glue, companions, the fit's report.

This is the face the other layers import; what is not listed here is the layer's own."""

from .arguments import flat_field_home
from .callback import MaskPruningCallback
from .fit_report import MaskLogging, accuracies
from .optim import MaskOptimizer, ScoreOptimizers
from .sharding import full_state_dict, mask_before_sharding

__all__ = [
    "MaskLogging",
    "MaskOptimizer",
    "MaskPruningCallback",
    "ScoreOptimizers",
    "accuracies",
    "flat_field_home",
    "full_state_dict",
    "mask_before_sharding",
]
