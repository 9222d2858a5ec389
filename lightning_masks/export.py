"""Turn masked models and checkpoints into plain ones."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from .masks import PARAMETRIZATION_MARK, fold, masked_value

__all__ = ["fold", "fold_checkpoint", "fold_state_dict"]

_GATE_FIELDS = ("scores", "keep", "temperature", "gate_scale")


def fold_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return a copy of a masked state dict with every mask folded: ``<path>.<name> = w * gate * keep``.

    Raises:
        ValueError: a masked entry that misses a mask tensor, or is stacked on another parametrization.
    """
    folded: dict[str, Tensor] = {}
    masks: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if PARAMETRIZATION_MARK not in key:
            folded[key] = value
            continue
        path, _, rest = key.partition(PARAMETRIZATION_MARK)
        tensor_name, _, field = rest.partition(".")
        target = f"{path}.{tensor_name}" if path else tensor_name
        if field != "original" and field.removeprefix("0.") not in _GATE_FIELDS:
            raise ValueError(f"{key!r} belongs to a parametrization other than lightning_masks' alone; load the "
                             "checkpoint into the model with the callback and call lightning_masks.fold instead")
        masks.setdefault(target, {})[field.removeprefix("0.")] = value
    for target, parts in masks.items():
        missing = [f for f in ("original", "scores", "keep", "temperature") if f not in parts]
        if missing:
            raise ValueError(f"masked tensor {target!r} misses {missing} in the checkpoint; it is incomplete")
        folded[target] = masked_value(parts["original"], parts["scores"], parts["keep"].bool(),
                                      parts["temperature"], parts.get("gate_scale"))
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
    source, destination = Path(source), Path(destination)
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:  # corrupt, truncated or not a checkpoint at all
        raise ValueError(f"could not read checkpoint {str(source)!r} ({type(error).__name__}: {error}); "
                         "pass a checkpoint file written by Lightning") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(source)!r} is not a Lightning checkpoint (no 'state_dict'); pass one written by "
                         "Trainer.save_checkpoint or ModelCheckpoint")
    checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"])
    for key in ("optimizer_states", "lr_schedulers"):
        checkpoint.pop(key, None)
    callbacks = checkpoint.get("callbacks", {})
    for key in [k for k in callbacks if str(k).startswith("MaskPruningCallback")]:
        del callbacks[key]
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination
