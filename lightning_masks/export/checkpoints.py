"""Masked checkpoints made plain: fold a masked state dict or Lightning checkpoint into exact zeros, load one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from ..masking.gate import masked_value
from ..masking.kinds import weight_name
from ..masking.layout import GATE_FIELDS, ORIGINAL, REQUIRED_FIELDS, group_mask_keys, mask_key, split_mask_key
from .files import atomic_write

__all__ = ["fold_checkpoint", "fold_state_dict", "load_checkpoint"]

def fold_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return a copy of a masked state dict with every mask folded: ``<path>.<name> = w * gate * keep``.

    Raises:
        ValueError: a masked entry that misses a mask tensor, or is stacked on another parametrization.
    """
    masks = group_mask_keys(state_dict)
    folded = {key: value for key, value in state_dict.items() if split_mask_key(key) is None}
    for target, parts in masks.items():
        foreign = [field for field in parts if field not in (ORIGINAL, *GATE_FIELDS)]
        if foreign:
            raise ValueError(f"{mask_key(target, ORIGINAL)!r} carries {foreign}, of a parametrization other than "
                             "lightning_masks' alone; load the checkpoint into the model with the callback and call "
                             "lightning_masks.fold instead")
        if set(parts) == {ORIGINAL}:  # a bias gated by its layer's per-channel mask (kinds.bias_name)
            path, _, name = target.rpartition(".")
            weight = f"{path}.{weight_name(name)}" if path else weight_name(name)
            parts = {**masks.get(weight, {}), ORIGINAL: parts[ORIGINAL]}
            shape = parts[ORIGINAL].shape
            parts.update({k: parts[k].reshape(shape) for k in ("scores", "keep", "gate_scale")
                          if k in parts and parts[k].dim()})  # a 0-dim (per-tensor) gate_scale stays as it is
        missing = [f for f in REQUIRED_FIELDS if f not in parts]
        if missing:
            raise ValueError(f"masked tensor {target!r} misses {missing} in the checkpoint; it is incomplete")
        folded[target] = masked_value(parts[ORIGINAL], parts["scores"], parts["keep"].bool(),
                                      parts["temperature"], parts.get("gate_scale"), binary="binary" in parts)
    return folded


def fold_checkpoint(source: Union[str, os.PathLike], destination: Union[str, os.PathLike]) -> Path:
    """Write a copy of a masked Lightning checkpoint that ``YourModule.load_from_checkpoint`` loads.

    The model's masks are folded into plain weights with exact zeros; the optimizer and scheduler states
    (which refer to the mask scores) and this callback's state are dropped. ``destination`` is written
    atomically, so a failure leaves any existing file as it was.

    Example:
        >>> fold_checkpoint("masked.ckpt", "plain.ckpt")  # doctest: +SKIP
        >>> model = MyModule.load_from_checkpoint("plain.ckpt")  # doctest: +SKIP
    """
    checkpoint = load_checkpoint(source)
    checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"])
    for key in ("optimizer_states", "lr_schedulers"):
        checkpoint.pop(key, None)
    callbacks = checkpoint.get("callbacks", {})
    for key in [k for k in callbacks if str(k).startswith("MaskPruningCallback")]:
        del callbacks[key]
    return atomic_write(destination, lambda path: torch.save(checkpoint, path))


def load_checkpoint(source: Union[str, os.PathLike]) -> dict:
    """Read a Lightning checkpoint onto the CPU.

    Raises:
        ValueError: the file is missing, unreadable, or holds no ``state_dict``.
    """
    source = Path(source)
    if not source.is_file():
        raise ValueError(f"checkpoint {str(source)!r} does not exist; pass the path of a .ckpt file")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:  # corrupt, truncated or not a checkpoint at all
        raise ValueError(f"could not read checkpoint {str(source)!r} ({type(error).__name__}: {error}); "
                         "pass a checkpoint file written by Lightning") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(source)!r} is not a Lightning checkpoint (no 'state_dict'); pass one written by "
                         "Trainer.save_checkpoint or ModelCheckpoint")
    return checkpoint
