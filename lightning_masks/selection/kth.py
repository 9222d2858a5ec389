"""The exact k-th smallest key over many tensors, without concatenating them: a two-pass radix select.

Floats map to int32 keys with the same order (:func:`float_keys`); :func:`kth_key` histograms the high 16 bits
of every key in one pass and the low 16 bits of the chosen bucket in a second, in bounded batches, so the cost
is two reads of the keys and memory is one batch (no ``torch.quantile``, whose input is limited to 2^24
elements, and no model-sized concatenation). :class:`~lightning_masks.selection.selector.Selector` builds on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from torch import Tensor

from .distributed import summed

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py

SLICE = 1 << 22  # keys histogrammed per bincount, at most
PRUNED = -(1 << 31)  # int32 key of an entry that must stay pruned: below every float's key (-inf's included)
PROTECTED = (1 << 31) - 1  # int32 key of an entry the layer floor keeps: above every float's key


def key_value(key: int) -> float:
    """Invert :func:`float_keys` for one key: the float32 value it orders."""
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def float_keys(values: Tensor) -> Tensor:
    """Map float32 values to int32 keys with the same order (-inf lowest, NaN above +inf), in three int32 passes:
    the float's bits, with the magnitude bits of negative values flipped."""
    bits = values.float().contiguous().view(torch.int32)
    return (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def mark_pruned(keys: Tensor, keep: Tensor) -> Tensor:
    """Set the keys of pruned entries (``keep`` False) to ``PRUNED``, in place, with integer arithmetic."""
    kept = keep.reshape(-1).view(torch.uint8).to(torch.int32)  # 1 kept, 0 pruned (bool ops are slow on CPU)
    return keys.mul_(kept).add_(kept.sub_(1).bitwise_and_(PRUNED))


def _high_digits(keys: Tensor, out: Tensor) -> Tensor:
    """Write ``(keys >> 16) + 2^15``, in [0, 2^16), into the int32 ``out``: the high half read as int16 where the
    layout allows (an int32 shift is several times slower on CPU)."""
    if sys.byteorder == "little" and keys.is_contiguous():
        out.copy_(keys.view(torch.int16)[1::2])
    else:
        torch.bitwise_right_shift(keys, 16, out=out)
    return out.add_(1 << 15)


def _histogram(pieces: Iterator[Tensor], digits: Callable[[Tensor, Tensor], Tensor], bins: int, size: int,
               buffer: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Sum over ``pieces`` of the bincount of ``digits(piece, out)``, batched into one int32 buffer of up to
    ``size`` values per bincount (each bincount fills a ``bins``-long histogram; when all pieces fit the buffer,
    that one is the sum). Return the sum and the buffer (``None`` when there were no pieces and none was given),
    for the next pass to reuse."""
    hist, used = None, 0

    def count() -> None:
        nonlocal hist
        assert buffer is not None  # values are only ever written into a buffer
        counts = torch.bincount(buffer[:used], minlength=bins).cpu()
        hist = counts if hist is None else hist.add_(counts)

    for piece in pieces:
        if used and buffer is not None and (used + piece.numel() > buffer.numel() or buffer.device != piece.device):
            count()
            used = 0
        if buffer is None or buffer.device != piece.device or piece.numel() > buffer.numel():
            buffer = torch.empty(max(size, piece.numel()), dtype=torch.int32, device=piece.device)
        digits(piece.reshape(-1), buffer[used:used + piece.numel()])
        used += piece.numel()
    if used:
        count()
    return (hist if hist is not None else torch.zeros(bins, dtype=torch.int64)), buffer


def kth_key(pieces: Callable[[], Iterator[Tensor]], k: int, total: int | None = None) -> tuple[int, int, int]:
    """Return ``(key, below, equal)``: the k-th smallest int32 key (1-based) over everything ``pieces()`` yields,
    how many keys are smaller and how many equal it. ``pieces`` is called twice (once per radix pass); ``total``
    (their count, if known) sizes the digit buffer.

    Pass 1 histograms the high 16 bits; pass 2 the low 16 bits of the keys in the chosen bucket, the others
    clamped into two overflow bins (no boolean masks: integer clamps and bincounts only). Both passes share one
    digit buffer and sum their histograms in place: on a small model each 2^16-bin histogram costs more than
    the keys, and fresh half-megabyte buffers are fresh pages for the allocator to map. Within
    :func:`~lightning_masks.selection.distributed.across_shards` each pass's histogram is summed over the processes,
    so ``pieces`` are this process's shards and the key is the k-th over all of them.
    """
    size = 1 << 16
    batch = min(SLICE, total) if total else SLICE
    cumulative, buffer = _histogram(pieces(), _high_digits, size, batch)
    cumulative = summed(cumulative).cumsum_(0)  # summed over the shards of every process (distributed.across_shards)
    digit = int(torch.searchsorted(cumulative, k))
    if digit >= size:
        raise ValueError(f"cannot select {k} entries out of {int(cumulative[-1])}")
    below = int(cumulative[digit - 1]) if digit else 0
    base = (digit - (1 << 15)) << 16  # the smallest key of the bucket
    low = base - 1 if digit > 0 else base  # one overflow bin below the bucket, where a key can be below it
    high = base + size if digit < size - 1 else base + size - 1

    def offsets(piece: Tensor, out: Tensor) -> Tensor:
        return torch.clamp(piece, low, high, out=out).sub_(low)

    counts, _ = _histogram(pieces(), offsets, high - low + 1, batch, buffer)
    counts = summed(counts)
    inside = counts[base - low:base - low + size].cumsum_(0)
    offset = int(torch.searchsorted(inside, k - below))
    before = int(inside[offset - 1]) if offset else 0
    return base + offset, below + before, int(inside[offset]) - before


def top_mask(keys: Tensor, m: int) -> Tensor:
    """A bool mask of the ``m`` highest keys, ties broken towards later positions (the order selection keeps)."""
    cut = int(keys.kthvalue(keys.numel() - m + 1).values)
    top, tied = keys > cut, keys == cut
    left = m - int(top.count_nonzero())  # of the keys equal to the cut, how many are among the top m: the last ones
    n_tied = int(tied.count_nonzero())
    if left == n_tied:  # the usual case: no positions needed (nonzero costs as much as the kthvalue)
        return top.logical_or_(tied)
    top[tied.nonzero().view(-1)[n_tied - left:]] = True
    return top
