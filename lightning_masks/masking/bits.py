"""Bool tensors packed eight entries a byte along their last dimension (the keep bits' storage, sparse files).

Rows stay whole: entry ``(..., j)`` is bit ``7 - j % 8`` (most significant first) of byte ``(..., j // 8)``, so a
tensor split along any leading dimension (e.g. a shard of dim 0) holds exactly its rows' bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_rows", "packed_shape", "unpack_rows"]


def packed_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of :func:`pack_rows` of a tensor of ``shape``: the last dimension ``ceil(n / 8)`` (a 0-dim
    tensor packs as one entry)."""
    shape = tuple(shape) or (1,)
    return (*shape[:-1], (shape[-1] + 7) // 8)


def _shifts(device: torch.device) -> Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)


def pack_rows(bits: Tensor) -> Tensor:
    """Pack a bool tensor ``(..., n)`` into uint8 ``(..., ceil(n / 8))``, eight entries a byte, the last ones padded
    with zeros."""
    bits = bits.reshape(packed_shape(bits.shape)[:-1] + (bits.shape[-1] if bits.dim() else 1,))
    padding = -bits.shape[-1] % 8
    as_bytes = bits.to(torch.uint8)
    if padding:
        as_bytes = torch.nn.functional.pad(as_bytes, (0, padding))
    grouped = as_bytes.unflatten(-1, (-1, 8))
    return (grouped << _shifts(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_rows(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`: a fresh bool tensor ``(..., n)``."""
    values = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(packed.unsqueeze(-1), values).ne(0).flatten(-2)
    return bits if bits.shape[-1] == n else bits[..., :n]
