"""What selection ranks (:mod:`lightning_masks.selection.selector`): masked tensors, or tensors tied unit by unit, and
their int32 importance keys (:mod:`lightning_masks.selection.kth`), held in one bounded buffer or recomputed per
tensor; writing their keep bits."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..masking import MaskedTensor
from . import distributed, kth
from .kth import PROTECTED, float_keys, kth_key, mark_pruned

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py

CACHE_ELEMENTS = 1 << 23  # importance keys kept between passes (32 MiB of int32), not more


@dataclass(eq=False)
class TiedUnits:
    """Masked tensors pruned together, unit by unit: one keep decision per unit, written to every member.

    E.g. the BatchNorms that all add into one residual stream: a stream channel is then zero in every
    block, so :func:`~lightning_masks.export.command.shrink` can remove it. A unit's importance is the sum of its
    members' (``logsumexp`` of their log importances); it is alive while any member keeps it.
    """

    members: list[MaskedTensor]

    @property
    def name(self) -> str:
        return "+".join(member.name for member in self.members)

    @property
    def units(self) -> int:
        return self.members[0].units

    @property
    def keep(self) -> Tensor:
        keeps = [member.gate.keep.reshape(-1) for member in self.members]
        return (keeps[0] if len(keeps) == 1 else torch.stack(keeps).any(0)).view(self.members[0].gate.scores.shape)


#: What selection ranks: one masked tensor, or tensors tied unit by unit.
Ranked = Union[MaskedTensor, TiedUnits]


def _keep_above(keys: Tensor, key: int, ties: int, equal: int) -> tuple[Tensor, int]:
    """The keep of ``keys`` for a cut at ``key``: the keys above it, and those equal to it after the first ``ties``
    (``equal`` of them in all, these keys and the ones after); return it and the ties still to prune after these."""
    keep = torch.gt(keys, key)
    if ties < equal:
        tied = keys == key
        if ties > 0:
            n_tied = int(tied.count_nonzero())
            if n_tied > ties:
                keep[tied.nonzero().view(-1)[ties:]] = True
            ties = max(ties - n_tied, 0)
        else:
            keep |= tied
    return keep, ties


class Keys:
    """The int32 keys of one selection's ranked units, computed once for all its passes (each cut's two radix
    passes and its keep, the layer floor's top entries) while they fit in ``CACHE_ELEMENTS``; beyond that, the first
    entries' are kept up to the bound and the others recomputed per pass (bounded memory).

    ``values(entry)`` is the float32 importance of the entry's ranked units (``sizes`` of them per entry), and
    ``marked(entry)`` its keep when its pruned units are among them (they get ``PRUNED``), else ``None``. When all
    keys fit (and sit on one device) they are one flat buffer in entry order: the integer passes (keys, marks, both
    cuts, ties) are then one operation over every tensor rather than one per tensor; on small models (a tiny GPT-2's
    8 tensors of 4-16k weights) the per-tensor calls cost more than the arithmetic. The keys and their order are the
    same either way (ties break by entry order, then flat index); the importance is still computed tensor by tensor.
    """

    def __init__(self, masked: Sequence[Ranked], sizes: list[int], values: Callable[[Ranked], Tensor],
                 marked: Callable[[Ranked], Optional[Tensor]]) -> None:
        self.masked, self.sizes, self.values, self.marked = masked, sizes, values, marked
        self.size = sum(sizes)
        self.protected: dict[int, Tensor] = {}
        self.kept: dict[int, Tensor] = {}
        self.cached = 0
        self.flat: Optional[Tensor] = None
        self.one_buffer = self.size <= CACHE_ELEMENTS and len({keep_of(entry).device for entry in masked}) == 1

    def _compute(self, entries: Sequence[Ranked]) -> Tensor:
        """The keys of ``entries``' ranked units, in order, in one buffer."""
        values = [self.values(entry) for entry in entries]
        flat = values[0] if len(values) == 1 else torch.cat(values)
        if flat.numel() and torch.isnan(flat.max()):  # one reduction; then find the tensor to name
            for entry, value in zip(entries, values):
                refuse_nan(entry, value)
        keys = float_keys(flat)
        marks = [self.marked(entry) for entry in entries]
        if any(mark is not None for mark in marks):
            keep = [torch.ones(len(value), dtype=torch.bool, device=value.device) if mark is None
                    else mark.reshape(-1) for mark, value in zip(marks, values)]
            mark_pruned(keys, keep[0] if len(keep) == 1 else torch.cat(keep))
        return keys

    def _flat(self) -> Optional[Tensor]:
        if self.flat is None and self.one_buffer:
            self.flat = self._compute(self.masked)
            self.kept = dict(zip(map(id, self.masked), self.flat.split(self.sizes)))
        return self.flat

    def of(self, entry: Ranked) -> Tensor:
        """The keys of one entry's ranked units (a view into the flat buffer, when there is one)."""
        self._flat()
        keys = self.kept.get(id(entry))
        if keys is None:
            keys = self._compute([entry])
            if id(entry) in self.protected:
                keys.masked_fill_(self.protected[id(entry)], PROTECTED)
            if self.cached + keys.numel() <= CACHE_ELEMENTS:
                self.kept[id(entry)] = keys
                self.cached += keys.numel()
        return keys

    def protect(self, protected: dict[int, Tensor]) -> None:
        """From now on give the units ``protected`` (per entry, a mask of its ranked units) the key ``PROTECTED``."""
        self.protected = protected
        for ident, mask in protected.items():
            if ident in self.kept:
                self.kept[ident].masked_fill_(mask, PROTECTED)

    def pieces(self) -> Iterator[Tensor]:
        flat = self._flat()
        if flat is not None:
            yield from flat.split(kth.SLICE)
            return
        for entry in self.masked:
            yield from self.of(entry).split(kth.SLICE)

    def above(self, key: int, ties: int, equal: int) -> list[Tensor]:
        """Per entry, the keep of its ranked units for a cut at ``key`` (see :func:`_keep_above`)."""
        if distributed.active():
            return _above_across_shards([self.of(entry) for entry in self.masked], key, ties, equal)
        flat = self._flat()
        if flat is not None:
            return list(_keep_above(flat, key, ties, equal)[0].split(self.sizes))
        keeps = []
        for entry in self.masked:
            keep, ties = _keep_above(self.of(entry), key, ties, equal)
            keeps.append(keep)
        return keeps


def _above_across_shards(keys: Sequence[Tensor], key: int, ties: int, equal: int) -> list[Tensor]:
    """:meth:`Keys.above` over shards: each shard prunes the equal keys the global order puts among the first
    ``ties`` (those on earlier tensors and lower ranks come first)."""
    if not 0 < ties < equal:
        return [_keep_above(k, key, ties, equal)[0] for k in keys]
    before = distributed.preceding([int((k == key).count_nonzero()) for k in keys])
    return [_keep_above(k, key, max(ties - b, 0), equal)[0] for k, b in zip(keys, before)]


def top_of(keys: Tensor, m: int) -> Tensor:
    """A bool mask of the ``m`` highest of ``keys``, ties broken towards later positions (as
    :func:`~lightning_masks.selection.kth.top_mask`), where ``keys`` may be one process's shard of a tensor split
    across processes (:func:`~lightning_masks.selection.distributed.across_shards`): ``m`` counts over all shards."""
    if not distributed.active():
        return kth.top_mask(keys, m)
    n = distributed.summed_counts([keys.numel()])[0]
    if m >= n:
        return torch.ones_like(keys, dtype=torch.bool)
    key, below, equal = kth_key(lambda: iter([keys]), n - m, keys.numel())
    return _above_across_shards([keys], key, n - m - below, equal)[0]


def members(entry: Ranked) -> list[MaskedTensor]:
    return entry.members if isinstance(entry, TiedUnits) else [entry]


def keep_of(entry: Ranked) -> Tensor:
    return entry.keep if isinstance(entry, TiedUnits) else entry.gate.keep


def refuse_nan(entry: Ranked, *tensors: Tensor) -> None:
    """Raise, naming the tensor, if any of ``tensors`` holds NaN (``max`` propagates it: one reduction, no mask)."""
    if any(t.numel() and torch.isnan(t.max()) for t in tensors):
        raise ValueError(f"mask importance of {entry.name!r} is NaN: its weight or scores hold NaN; "
                         "lower the learning rate or check the model for a divergence")


def set_keep(entry: Ranked, keep: Tensor, flips: dict[str, Tensor]) -> None:
    """Write ``keep`` into the mask (every member's, for tied tensors), counting the bits that change."""
    for member in members(entry):
        flips[member.name] = torch.ne(member.gate.keep.reshape(-1), keep.reshape(-1)).count_nonzero()  # no int64
        member.gate.set_keep(keep)
