"""The mask mechanism: nn.Module in, masked nn.Module out (gate, attach/fold, layer kinds, targets, initializers,
state-dict layout, statistics). Imports no Lightning and no selection.

This is the face the other layers import; what is not listed here is the layer's own."""

from .activations import input_norms
from .bits import pack_rows, unpack_rows
from .copies import follow_masks, mask_like
from .gate import MaskGate, along_bias, cached_gates, masked_value, reduce_to, temperature_divisor
from .hiding import masks_hidden
from .initializers import (
    Initializer,
    InitSpec,
    get_initializer,
    list_initializers,
    register_initializer,
    standardized,
)
from .inputs import as_arguments, call_with
from .kinds import (
    LayerKind,
    get_layer_kind,
    kind_of,
    list_layer_kinds,
    output_axis,
    register_layer_kind,
    undeclared_layout,
    weight_name,
)
from .layout import (
    GATE_FIELDS,
    ORIGINAL,
    PARAMETRIZATION_MARK,
    REQUIRED_FIELDS,
    group_mask_keys,
    mask_key,
    saved_keep,
    split_mask_key,
)
from .loading import restore_masks_on_load
from .masks import MaskedTensor, attach, detach, fold, gates_disabled, keep_bits_cached, masked_tensors
from .outputs import kept_whole
from .patterns import GumbelPatterns, RelaxedGroups
from .plain import folded_state, plain_saves, plain_state_dict, remove_plain_saves
from .sharded import is_sharded, local_entries, shard_with_weights
from .state import MaskState
from .stats import nonzero_counts
from .targets import Targets, TargetSpec, resolve_targets

__all__ = [
    "GATE_FIELDS",
    "GumbelPatterns",
    "InitSpec",
    "Initializer",
    "LayerKind",
    "MaskGate",
    "MaskState",
    "MaskedTensor",
    "ORIGINAL",
    "PARAMETRIZATION_MARK",
    "REQUIRED_FIELDS",
    "RelaxedGroups",
    "TargetSpec",
    "Targets",
    "along_bias",
    "as_arguments",
    "attach",
    "cached_gates",
    "call_with",
    "detach",
    "fold",
    "folded_state",
    "follow_masks",
    "gates_disabled",
    "get_initializer",
    "get_layer_kind",
    "group_mask_keys",
    "input_norms",
    "is_sharded",
    "keep_bits_cached",
    "kept_whole",
    "kind_of",
    "list_initializers",
    "list_layer_kinds",
    "local_entries",
    "mask_key",
    "mask_like",
    "masked_tensors",
    "masked_value",
    "masks_hidden",
    "nonzero_counts",
    "output_axis",
    "pack_rows",
    "plain_saves",
    "plain_state_dict",
    "reduce_to",
    "register_initializer",
    "register_layer_kind",
    "remove_plain_saves",
    "resolve_targets",
    "restore_masks_on_load",
    "saved_keep",
    "shard_with_weights",
    "split_mask_key",
    "standardized",
    "temperature_divisor",
    "undeclared_layout",
    "unpack_rows",
    "weight_name",
]
