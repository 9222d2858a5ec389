"""Scores -> keep-masks: exact counts, global or per layer, element or N:M, without a model-sized copy.

Global selection finds the exact k-th smallest importance with a three-pass radix select over the
float bit patterns, one tensor (in bounded slices) at a time: no concatenation, no ``torch.quantile``
(limited to 2^24 elements), and ties broken by position (tensor order, then flat index).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .masks import MaskedTensor

__all__ = [
    "IMPORTANCE",
    "Granularity",
    "Selection",
    "Selector",
    "kth_smallest",
    "parse_granularity",
]

_SLICE = 1 << 22
_CACHE_ELEMENTS = 1 << 23  # importance values kept between passes (32 MiB of float32), not more
_RADIX_PASSES = ((16, 16), (0, 16))  # (shift, bits): 32 key bits, high to low


def _log_sigmoid(entry: MaskedTensor) -> Tensor:
    """Log of the raw gate ``sigmoid(scores / T)``: orders like the gate without saturating at 1."""
    gate = entry.gate
    return torch.nn.functional.logsigmoid(gate.scores.detach().float() / gate.temperature)


def _gate_importance(entry: MaskedTensor) -> Tensor:
    """Log of the gate as the network applies it (rescaled when ``rescale_gate`` is on)."""
    scale = entry.gate.gate_scale
    return _log_sigmoid(entry) if scale is None else _log_sigmoid(entry) + scale.float().log()


def _effective_weight_importance(entry: MaskedTensor) -> Tensor:
    """Log of ``|w * gate|``: the weight-dependent criterion (per channel, the channel's mean ``|w|``)."""
    magnitude = entry.weight.detach().float().abs()
    if entry.unit_size > 1:
        magnitude = magnitude.reshape(entry.units, -1).mean(1).reshape(entry.gate.keep.shape)
    return magnitude.log() + _gate_importance(entry)


#: Importance criteria: a masked tensor -> a float32 tensor of its shape (higher is kept first).
IMPORTANCE: dict[str, Callable[[MaskedTensor], Tensor]] = {
    "gate": _gate_importance,
    "effective_weight": _effective_weight_importance,
}


def _keys(values: Tensor) -> Tensor:
    """Map float32 values to int64 keys in [0, 2^32) with the same order (-inf lowest)."""
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
            keys = _keys(piece)
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


def _key_value(key: int) -> float:
    """Invert :func:`_keys` for one key."""
    bits = key - (1 << 31)
    bits = bits ^ 0x7FFFFFFF if bits < 0 else bits
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


class Selection(NamedTuple):
    """What one mask update did: the entries now pruned, the cut, and the keep bits it flipped.

    ``threshold`` is the importance of the last pruned entry in linear scale (``|w * gate|`` or the gate)
    for global selection, the gate threshold for threshold schedules, and ``None`` where each tensor
    has its own cut (per layer, N:M) or nothing was pruned. ``flipped`` maps each tensor's name to the
    number of its keep bits this update changed (0-dim tensors on its device: no host sync).
    """

    pruned: int
    threshold: Optional[float]
    flipped: dict[str, Tensor]


class _BoundedCache:
    """Per-tensor importance kept across the passes of one selection while the cached total stays under
    ``_CACHE_ELEMENTS``: small models compute it once, large ones recompute it per pass (bounded memory)."""

    def __init__(self) -> None:
        self.values: dict[int, Tensor] = {}
        self.size = 0

    def get(self, entry: MaskedTensor, compute: Callable[[MaskedTensor], Tensor]) -> Tensor:
        if id(entry) in self.values:
            return self.values[id(entry)]
        values = compute(entry)
        if self.size + values.numel() <= _CACHE_ELEMENTS:
            self.values[id(entry)] = values
            self.size += values.numel()
        return values


def _set_keep(entry: MaskedTensor, keep: Tensor, flipped: dict[str, Tensor]) -> None:
    """Write ``keep`` into the tensor's mask, counting the bits that change."""
    flipped[entry.name] = (entry.gate.keep != keep).sum()
    entry.gate.keep.copy_(keep)


@dataclass(frozen=True)
class Granularity:
    """``element``, ``channel`` (one mask per output channel) or ``N:M`` (in every group of ``m``
    consecutive weights, ``n`` are kept)."""

    n: int = 0
    m: int = 0
    channel: bool = False

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.is_nm else None


def parse_granularity(spec: str) -> Granularity:
    """Parse ``"element"``, ``"channel"`` or an ``"N:M"`` spec such as ``"2:4"`` (``0 < N < M``)."""
    if spec == "element":
        return Granularity()
    if spec == "channel":
        return Granularity(channel=True)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"invalid granularity {spec!r}; use 'element', 'channel' or an N:M spec with 0 < N < M, "
                         "e.g. '2:4'")
    return Granularity(int(match[1]), int(match[2]))


@dataclass(frozen=True)
class Selector:
    """Sets the keep-masks for a target sparsity.

    Args:
        mode: ``"global"`` ranks all masked tensors together; ``"layer"`` prunes each to the target.
        importance: a name in :data:`IMPORTANCE`: ``"gate"`` or the weight-dependent ``"effective_weight"``.
        layer_floor: in global mode every tensor keeps at least ``ceil(layer_floor * (1 - target) * units)``
            entries, a fraction of what a uniform split would give it, so no layer is wiped out. 0 disables.
        regrow: let pruned entries come back when their importance rises; off, pruned stays pruned.
        granularity: ``"element"``, ``"channel"`` or ``"N:M"``. Counts are in masked units: weights, or
            output channels.
    """

    mode: str = "global"
    importance: str = "effective_weight"
    layer_floor: float = 0.25
    regrow: bool = False
    granularity: str = "element"

    def __post_init__(self) -> None:
        if self.mode not in ("global", "layer"):
            raise ValueError(f"mode must be 'global' or 'layer', got {self.mode!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {self.importance!r}; known criteria: {sorted(IMPORTANCE)}")
        if not 0.0 <= self.layer_floor <= 1.0:
            raise ValueError(f"layer_floor must be in [0, 1], got {self.layer_floor!r}; 0 disables the floor")
        parse_granularity(self.granularity)

    @property
    def grain(self) -> Granularity:
        return parse_granularity(self.granularity)

    def check(self, masked: Sequence[MaskedTensor]) -> None:
        """Raise if a tensor cannot take this granularity (N:M needs rows divisible by M)."""
        m = self.grain.m
        for entry in masked:
            row = entry.weight[0].numel() if entry.weight.dim() > 1 else entry.numel
            if m and row % m:
                raise ValueError(f"{self.granularity} needs rows divisible by {m}, but {entry.name!r} of shape "
                                 f"{tuple(entry.weight.shape)} has rows of {row}; exclude it or pick another M")

    def _importance(self, entry: MaskedTensor) -> Tensor:
        values = IMPORTANCE[self.importance](entry)
        if torch.isnan(values).any():
            raise ValueError(f"mask importance of {entry.name!r} is NaN: its weight or scores hold NaN; "
                             "lower the learning rate or check the model for a divergence")
        if not self.regrow:
            values = values.masked_fill(~entry.gate.keep, -math.inf)
        return values

    @torch.no_grad()
    def __call__(self, masked: Sequence[MaskedTensor], target: float) -> Selection:
        """Set every ``gate.keep`` for ``target`` sparsity."""
        if self.grain.is_nm:
            flipped: dict[str, Tensor] = {}
            return Selection(sum(self._select_nm(entry, target, flipped) for entry in masked), None, flipped)
        if self.mode == "layer":
            each = [self._select([entry], target, floor=0.0) for entry in masked]
            return Selection(sum(s.pruned for s in each), None, {k: v for s in each for k, v in s.flipped.items()})
        return self._select(masked, target, floor=self.layer_floor)

    def _select(self, masked: Sequence[MaskedTensor], target: float, floor: float) -> Selection:
        total = sum(entry.units for entry in masked)
        already = sum(int((~entry.gate.keep).sum()) for entry in masked) if not self.regrow else 0
        count = max(round(target * total), already)
        cache = _BoundedCache()
        protected = {}
        if floor > 0:
            for entry in masked:
                minimum = math.ceil(floor * (1.0 - target) * entry.units)
                values = cache.get(entry, self._importance).reshape(-1)
                alive = int(torch.isfinite(values).sum()) if not self.regrow else entry.units
                protected[id(entry)] = values.topk(min(minimum, alive)).indices
        prunable = total - sum(index.numel() for index in protected.values())
        if count > prunable:
            raise ValueError(
                f"target sparsity {target} needs {count} of {total} entries pruned, but layer_floor={floor} "
                f"keeps {total - prunable}; lower layer_floor or the target"
            )

        def protect(entry: MaskedTensor) -> Tensor:
            values = cache.get(entry, self._importance)  # the floor's values are not needed any more
            if id(entry) in protected:
                values.view(-1)[protected[id(entry)]] = math.inf
            return values

        final = _BoundedCache()

        def importances() -> Iterator[Tensor]:
            for entry in masked:
                yield final.get(entry, protect)

        flipped: dict[str, Tensor] = {}
        if count == 0:
            for entry in masked:
                _set_keep(entry, torch.ones_like(entry.gate.keep), flipped)
            return Selection(0, None, flipped)
        key, ties = kth_smallest(importances, count)
        for entry, values in zip(masked, importances()):
            keep = torch.empty(values.numel(), dtype=torch.bool, device=values.device)
            for piece, out in zip(values.reshape(-1).split(_SLICE), keep.split(_SLICE)):
                keys = _keys(piece)
                equal = keys == key
                pruned = keys < key
                n_equal = int(equal.sum())
                if ties >= n_equal:
                    pruned |= equal
                elif ties > 0:  # the first ties, in position order, are pruned
                    pruned[equal.nonzero()[:ties, 0]] = True
                ties = max(ties - n_equal, 0)
                torch.logical_not(pruned, out=out)
            _set_keep(entry, keep.view_as(entry.gate.keep), flipped)
        return Selection(count, math.exp(_key_value(key)), flipped)

    def _select_nm(self, entry: MaskedTensor, target: float, flipped: dict[str, Tensor]) -> int:
        n, m = self.grain.n, self.grain.m
        per_group = round(min(target / self.grain.sparsity, 1.0) * (m - n))
        keep = torch.ones((entry.numel // m, m), dtype=torch.bool, device=entry.weight.device)
        if per_group:
            lowest = self._importance(entry).reshape(-1, m).topk(per_group, dim=1, largest=False).indices
            keep.scatter_(1, lowest, False)
        _set_keep(entry, keep.view_as(entry.gate.keep), flipped)
        return per_group * (entry.numel // m)

    @torch.no_grad()
    def threshold(self, masked: Sequence[MaskedTensor], threshold: float) -> Selection:
        """Prune every entry whose raw gate ``sigmoid(scores / T)`` is below ``threshold``."""
        pruned, flipped = 0, {}
        for entry in masked:
            keep = _log_sigmoid(entry) >= math.log(threshold) if threshold > 0 else torch.ones_like(entry.gate.keep)
            if not self.regrow:
                keep &= entry.gate.keep
            _set_keep(entry, keep, flipped)
            pruned += int((~keep).sum())
        return Selection(pruned, threshold, flipped)
