"""Masked checkpoints made plain: fold a masked state dict or Lightning checkpoint into exact zeros, load one."""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import pickle
import re
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from ..masking import (
    GATE_FIELDS,
    ORIGINAL,
    REQUIRED_FIELDS,
    along_bias,
    group_mask_keys,
    mask_key,
    masked_value,
    saved_keep,
    split_mask_key,
    weight_name,
)
from .files import atomic_write

__all__ = ["fold_checkpoint", "fold_state_dict"]

#: What a Lightning checkpoint holds beyond tensors and plain containers, allowed to ``torch.load(weights_only=True)``:
#: hyperparameters given as an ``argparse.Namespace``, paths, and (when omegaconf is installed) the OmegaConf
#: containers that Hydra passes as arguments, with the node and metadata classes and builtins they rebuild from.
#: Each is data: unpickling one builds a container, it runs no code of the file's choosing.
_SAFE_GLOBALS: tuple = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                       pathlib.PureWindowsPath)
_OMEGACONF_GLOBALS = ("listconfig.ListConfig", "dictconfig.DictConfig", "base.ContainerMetadata", "base.Metadata",
                      "nodes.AnyNode", "nodes.StringNode", "nodes.IntegerNode", "nodes.FloatNode",
                      "nodes.BooleanNode", "nodes.BytesNode", "nodes.PathNode")
_UNSAFE_FLAG = "trust_pickle=True"

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
        bias = set(parts) == {ORIGINAL}  # a bias gated by its layer's per-channel mask (kinds.bias_name)
        if bias:
            path, _, name = target.rpartition(".")
            weight = f"{path}.{weight_name(name)}" if path else weight_name(name)
            parts = {**masks.get(weight, {}), ORIGINAL: parts[ORIGINAL]}
        missing = [f for f in REQUIRED_FIELDS if f not in parts]
        if missing:
            raise ValueError(f"masked tensor {target!r} misses {missing} in the checkpoint; it is incomplete")
        scores, keep = parts["scores"], saved_keep(parts)
        scale = parts.get("gate_scale")
        if bias:
            scores, keep, scale = along_bias(scores, keep, scale, parts[ORIGINAL].shape)
        folded[target] = masked_value(parts[ORIGINAL], scores, keep, parts["temperature"], scale,
                                      binary="binary" in parts)
    return folded


def fold_checkpoint(source: Union[str, os.PathLike], destination: Union[str, os.PathLike], *,
                    trust_pickle: bool = False) -> Path:
    """Write a copy of a masked Lightning checkpoint that ``YourModule.load_from_checkpoint`` loads.

    The model's masks are folded into plain weights with exact zeros; the optimizer and scheduler states
    (which refer to the mask scores) and this callback's state are dropped. ``destination`` is written
    atomically, so a failure leaves any existing file as it was. ``source`` is read as :func:`load_checkpoint` reads
    it (``trust_pickle`` there).

    Example:
        >>> fold_checkpoint("masked.ckpt", "plain.ckpt")  # doctest: +SKIP
        >>> model = MyModule.load_from_checkpoint("plain.ckpt")  # doctest: +SKIP
    """
    checkpoint = load_checkpoint(source, trust_pickle=trust_pickle)
    checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"])
    for key in ("optimizer_states", "lr_schedulers"):
        checkpoint.pop(key, None)
    callbacks = checkpoint.get("callbacks", {})
    for key in [k for k in callbacks if str(k).startswith("MaskPruningCallback")]:
        del callbacks[key]
    return atomic_write(destination, lambda path: torch.save(checkpoint, path))


def _safe_globals() -> list:
    found = list(_SAFE_GLOBALS)
    try:
        import omegaconf
    except ImportError:
        return found
    for dotted in _OMEGACONF_GLOBALS:
        module, _, name = dotted.partition(".")
        value = getattr(getattr(omegaconf, module, None), name, None)
        if value is not None:
            found.append(value)
    return found + [typing.Any, list, dict, int, float, str, bool, collections.defaultdict]


@contextmanager
def checkpoint_globals() -> Iterator[None]:
    """Within the block, ``torch.load(..., weights_only=True)`` (also Lightning's ``load_from_checkpoint``) accepts
    the few types of :data:`_SAFE_GLOBALS` that Lightning checkpoints hold, and nothing else that would run code."""
    with torch.serialization.safe_globals(_safe_globals()):
        yield


def load_checkpoint(source: Union[str, os.PathLike], *, trust_pickle: bool = False) -> dict:
    """Read a Lightning checkpoint onto the CPU, safely: tensors, plain containers and :data:`_SAFE_GLOBALS` only.

    A checkpoint is a pickle, and unpickling an arbitrary object can run any code its author chose. It is read
    with ``torch.load(weights_only=True)``, which refuses every other type (torch's serialization notes).

    Args:
        source: a ``.ckpt`` file.
        trust_pickle: read any pickled object (``weights_only=False``): only for a file you wrote yourself or
            trust; its hyperparameters may hold objects of your own classes.

    Raises:
        ValueError: the file is missing, unreadable, holds no ``state_dict``, or (without ``trust_pickle``) holds
            an object outside the safe types, named with the ``trust_pickle=True`` flag that reads it anyway.
    """
    source = Path(source)
    if not source.is_file():
        raise ValueError(f"checkpoint {str(source)!r} does not exist; pass the path of a .ckpt file")
    try:
        with checkpoint_globals():
            checkpoint = torch.load(source, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        if trust_pickle:
            raise ValueError(f"could not read checkpoint {str(source)!r} ({type(error).__name__}: {error}); "
                             "pass a checkpoint file written by Lightning") from error
        raise ValueError(f"checkpoint {str(source)!r} holds objects other than tensors and plain data, and "
                         f"unpickling them could run code ({_refused_global(error)}); it was not loaded. If you trust "
                         f"the file, load it with {_UNSAFE_FLAG} (lightning-masks-export --unsafe-pickle)") from error
    except Exception as error:  # corrupt, truncated or not a checkpoint at all
        raise ValueError(f"could not read checkpoint {str(source)!r} ({type(error).__name__}: {error}); "
                         "pass a checkpoint file written by Lightning") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(source)!r} is not a Lightning checkpoint (no 'state_dict'); pass one written by "
                         "Trainer.save_checkpoint or ModelCheckpoint")
    return checkpoint


def _refused_global(error: Exception) -> str:
    """What torch refused to unpickle (its message goes on with advice about its own API)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return f"it refers to {found.group(1)}" if found else str(error).strip().splitlines()[-1]
