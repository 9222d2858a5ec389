"""The sparse file format: a state dict in safetensors with each mostly-zero tensor stored as packed nonzero bits
plus its nonzero values."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from .._extras import extra
from ..masking import pack_rows, unpack_rows
from .files import atomic_write

with extra("export"):
    import safetensors.torch

__all__ = ["save_sparse"]

_SPARSE_MARK = "::"
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


def _pack_bits(mask: Tensor) -> Tensor:
    """Pack a flat bool tensor into uint8, eight entries a byte, most significant bit first."""
    return pack_rows(mask.reshape(-1))


def _unpack_bits(bits: Tensor, count: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: the first ``count`` entries as a flat bool tensor."""
    return unpack_rows(bits.reshape(-1), (count,))


def _encode(name: str, tensor: Tensor) -> dict[str, Tensor]:
    """Store ``tensor`` as bitmask + values when that is smaller than the dense bytes, else as it is."""
    tensor = tensor.detach().cpu()
    if tensor.is_complex() or tensor.numel() == 0:
        return {name: tensor.clone().contiguous()}
    keep = _nonzero_bits(tensor)
    sparse_bytes = (keep.numel() + 7) // 8 + int(keep.sum()) * tensor.element_size() + 8 * tensor.dim()
    if sparse_bytes >= tensor.numel() * tensor.element_size():
        return {name: tensor.clone().contiguous()}
    return {f"{name}{_SPARSE_MARK}bits": _pack_bits(keep), f"{name}{_SPARSE_MARK}values": tensor.reshape(-1)[keep],
            f"{name}{_SPARSE_MARK}shape": torch.tensor(tensor.shape, dtype=torch.int64)}


def _check_state_dict(state_dict: dict) -> None:
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; save_sparse "
                             "stores tensors only: drop that entry or save it separately")
        if _SPARSE_MARK in key:
            raise ValueError(f"state dict key {key!r} contains {_SPARSE_MARK!r}, which marks sparse entries; "
                             "rename the module")


def _dense_size(state_dict: dict[str, Tensor]) -> int:
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
    sparse_tensors = sum(key.endswith(f"{_SPARSE_MARK}bits") for key in encoded)
    return SparseFileInfo(path, len(data), _dense_size(state_dict), sparse_tensors)


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
        name, _, part = key.partition(_SPARSE_MARK)
        if not part:
            state[name] = tensor
        elif part == "values":
            shape = flat[f"{name}{_SPARSE_MARK}shape"].tolist()
            keep = _unpack_bits(flat[f"{name}{_SPARSE_MARK}bits"], math.prod(shape))
            dense = torch.zeros(keep.numel(), dtype=tensor.dtype)
            dense[keep] = tensor
            state[name] = dense.reshape(shape)
    return state


# --- physical shrink ---------------------------------------------------------------------------------------------
