"""Pruning chosen entries of a gate by hand (its keep bits are packed: written through ``set_keep`` only)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_masks import MaskGate


def prune(gate: MaskGate, index: Any, flat: bool = False) -> None:
    """Set ``gate``'s keep bits at ``index`` (of the keep's shape, or of its flat view with ``flat``) to False."""
    keep = gate.keep.clone()
    (keep.view(-1) if flat else keep)[index] = False
    gate.set_keep(keep)


def keep_all(gate: MaskGate) -> None:
    gate.set_keep(torch.ones_like(gate.keep))
