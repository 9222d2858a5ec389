"""Bool tensors packed eight entries a byte, row by row (the keep bits' storage, sparse files).

A tensor's rows are its slices along dim 0; each row (its other dimensions flattened) is packed on its own, most
significant bit first, its last byte padded with zeros. A slice of rows (e.g. a shard of dim 0) then holds exactly
its rows' bits, and padding costs at most a byte a row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack_rows", "unpack_rows"]

_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)


def _row_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """``(rows, entries a row)`` for two or more dimensions, ``(entries,)`` for one (a 0-dim tensor is one entry)."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (math.prod(shape),)


def packed_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of :func:`pack_rows` of a tensor of ``shape``: ``(rows, ceil(entries a row / 8))``, or
    ``(ceil(entries / 8),)`` for one dimension."""
    rows = _row_shape(shape)
    return (*rows[:-1], (rows[-1] + 7) // 8)


def pack_rows(bits: Tensor) -> Tensor:
    """Pack a bool tensor into uint8 of :func:`packed_shape`, eight entries a byte, row by row."""
    as_bytes = bits.reshape(_row_shape(bits.shape)).to(torch.uint8)
    padding = -as_bytes.shape[-1] % 8
    if padding:
        as_bytes = torch.nn.functional.pad(as_bytes, (0, padding))
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return (as_bytes.unflatten(-1, (-1, 8)) << shifts).sum(-1, dtype=torch.uint8)


def unpack_rows(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_rows`: a fresh bool tensor of ``shape`` (the packed tensor's rows, or a slice of them
    with ``shape[0]`` the slice's)."""
    values = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(packed.unsqueeze(-1), values).ne(0).flatten(-2)
    width = _row_shape(shape)[-1]
    return (bits if bits.shape[-1] == width else bits[..., :width]).reshape(shape)
