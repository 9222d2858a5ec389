"""Scores to keep bits: the Selector, importance criteria, the exact k-th engine, ties.

This is the face the other layers import; what is not listed here is the layer's own."""

from .coupling import coupled_channels, ties_among
from .distributed import across_shards
from .importance import list_importances, register_importance
from .selector import Selector

__all__ = [
    "Selector",
    "across_shards",
    "coupled_channels",
    "list_importances",
    "register_importance",
    "ties_among",
]
