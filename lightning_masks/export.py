"""Turn masked models and checkpoints into plain ones."""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import safetensors.torch
import torch
from torch import Tensor

from .masks import PARAMETRIZATION_MARK, fold, masked_value

__all__ = [
    "SparseFileInfo",
    "fold",
    "fold_checkpoint",
    "fold_state_dict",
    "load_sparse",
    "save_sparse",
]

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


def atomic_write(destination: Union[str, os.PathLike], write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` and move the result onto ``destination``: all or nothing."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination


# --- sparse save -------------------------------------------------------------------------------------------------

#: Marks the keys of a tensor stored sparse: ``<name>::bits`` (packed keep bits), ``::values``, ``::shape``.
SPARSE_MARK = "::"
_BIT_ORDER = torch.arange(7, -1, -1, dtype=torch.uint8)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class SparseFileInfo:
    """What :func:`save_sparse` wrote: the file, its size and the size of ``torch.save`` of the dense dict."""

    path: Path
    sparse_bytes: int
    dense_bytes: int
    sparse_tensors: int

    @property
    def ratio(self) -> float:
        """Sparse file size over dense file size."""
        return self.sparse_bytes / self.dense_bytes


def _nonzero_bits(tensor: Tensor) -> Tensor:
    """Flat mask of the entries whose bits are not all zero (so ``-0.0`` and NaN are kept, bit-exact)."""
    flat = tensor.reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.view(_SAME_SIZE_INT[flat.element_size()])
    return flat != 0


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a flat bool tensor into uint8, eight entries a byte, most significant bit first."""
    padded = torch.zeros((mask.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask
    return (padded.view(-1, 8) << _BIT_ORDER).sum(1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` entries as a flat bool tensor."""
    return ((bits.unsqueeze(1) >> _BIT_ORDER) & 1).reshape(-1)[:count].bool()


def _encode(name: str, tensor: Tensor) -> dict[str, Tensor]:
    """Store ``tensor`` as bitmask + values when that is smaller than the dense bytes, else as it is."""
    tensor = tensor.detach().cpu()
    if tensor.is_complex() or tensor.numel() == 0:
        return {name: tensor.clone().contiguous()}
    keep = _nonzero_bits(tensor)
    sparse_bytes = (keep.numel() + 7) // 8 + int(keep.sum()) * tensor.element_size() + 8 * tensor.dim()
    if sparse_bytes >= tensor.numel() * tensor.element_size():
        return {name: tensor.clone().contiguous()}
    return {f"{name}{SPARSE_MARK}bits": pack_bits(keep), f"{name}{SPARSE_MARK}values": tensor.reshape(-1)[keep],
            f"{name}{SPARSE_MARK}shape": torch.tensor(tensor.shape, dtype=torch.int64)}


def _check_state_dict(state_dict: dict) -> None:
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; save_sparse "
                             "stores tensors only: drop that entry or save it separately")
        if SPARSE_MARK in key:
            raise ValueError(f"state dict key {key!r} contains {SPARSE_MARK!r}, which marks sparse entries; "
                             "rename the module")


def dense_size(state_dict: dict[str, Tensor]) -> int:
    """Bytes of ``torch.save(state_dict)``: the dense file a user would otherwise ship."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getbuffer().nbytes


def save_sparse(state_dict: dict[str, Tensor], destination: Union[str, os.PathLike]) -> SparseFileInfo:
    """Write a (folded) state dict as safetensors, mostly-zero tensors as a bitmask plus their nonzero values.

    The file loads back bit-exactly with :func:`load_sparse`, or in plain PyTorch with the few lines in the
    README (``safetensors`` and ``torch`` only). ``destination`` is written atomically.

    Raises:
        ValueError: an entry is not a tensor, or a key holds the reserved ``"::"``.

    Example:
        >>> info = save_sparse(fold_state_dict(checkpoint["state_dict"]), "model.safetensors")  # doctest: +SKIP
        >>> print(f"{info.ratio:.3f} of the dense file")  # doctest: +SKIP
    """
    _check_state_dict(state_dict)
    encoded: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        encoded.update(_encode(name, tensor))
    data = safetensors.torch.save(encoded, metadata={"format": "pt", "lightning_masks": "sparse/1"})
    path = atomic_write(destination, lambda temporary: Path(temporary).write_bytes(data))
    sparse_tensors = sum(key.endswith(f"{SPARSE_MARK}bits") for key in encoded)
    return SparseFileInfo(path, len(data), dense_size(state_dict), sparse_tensors)


def load_sparse(source: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` back into the exact dense state dict.

    Raises:
        ValueError: the file is missing or is not a safetensors file.
    """
    source = Path(source)
    if not source.is_file():
        raise ValueError(f"sparse file {str(source)!r} does not exist; pass a file written by save_sparse")
    try:
        flat = safetensors.torch.load_file(source)
    except Exception as error:
        raise ValueError(f"could not read sparse file {str(source)!r} ({type(error).__name__}: {error}); pass a "
                         "file written by save_sparse or lightning-masks-export") from error
    state: dict[str, Tensor] = {}
    for key, tensor in flat.items():
        name, _, part = key.partition(SPARSE_MARK)
        if not part:
            state[name] = tensor
        elif part == "values":
            shape = flat[f"{name}{SPARSE_MARK}shape"].tolist()
            keep = unpack_bits(flat[f"{name}{SPARSE_MARK}bits"], math.prod(shape))
            dense = torch.zeros(keep.numel(), dtype=tensor.dtype)
            dense[keep] = tensor
            state[name] = dense.reshape(shape)
    return state
