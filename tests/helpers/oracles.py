"""Reference implementations the tests check the library against (they may be slow or concatenate)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

_SLICE = 1 << 22
_RADIX_PASSES = ((16, 16), (0, 16))  # (shift, bits): 32 key bits, high to low


def keys64(values: Tensor) -> Tensor:
    """Map float32 values to int64 keys in [0, 2^32) with the same order (-inf lowest): the library's int32 keys
    plus 2^31, computed the plain way."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _slices(tensors: Callable[[], Iterator[Tensor]]) -> Iterator[Tensor]:
    for tensor in tensors():
        yield from tensor.reshape(-1).split(_SLICE)


def kth_smallest(tensors: Callable[[], Iterator[Tensor]], k: int) -> tuple[int, int]:
    """Return ``(key, ties)``: the k-th smallest key (1-based) over all tensors ``tensors()`` yields.

    ``ties`` is how many entries with exactly that key are among the k smallest. ``tensors`` is called
    once per radix pass, so it may compute each tensor on the fly.
    """
    prefix, remaining, done_bits = 0, k, 0
    for shift, bits in _RADIX_PASSES:
        hist = torch.zeros(1 << bits, dtype=torch.int64)
        for piece in _slices(tensors):
            keys = keys64(piece)
            if done_bits:
                keys = keys[(keys >> (shift + bits)) == prefix]
            hist += torch.bincount((keys >> shift) & ((1 << bits) - 1), minlength=1 << bits).cpu()
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, remaining))
        if digit >= cumulative.numel():
            raise ValueError(f"cannot select {k} entries out of {int(cumulative[-1])}")
        if digit:
            remaining -= int(cumulative[digit - 1])
        prefix, done_bits = (prefix << bits) | digit, done_bits + bits
    return prefix, remaining
