"""Plain checkpoints, sparse files, shrink and the export command.

This is the face the other layers import. Plain checkpoints need torch alone; ``save_sparse`` loads its module, and
so its extra, when first used (``shrink``, which needs Torch-Pruning, is imported from
:mod:`lightning_masks.export.shrink`, the module of the same name)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .checkpoints import fold_checkpoint, fold_state_dict

if TYPE_CHECKING:
    from .sparse_file import save_sparse

__all__ = ["fold_checkpoint", "fold_state_dict", "save_sparse"]

_LAZY = {"save_sparse": "sparse_file"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
