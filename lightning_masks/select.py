"""Scores -> keep-masks: exact counts, global or per layer, element or N:M, without a model-sized copy.

Global selection finds the exact k-th smallest importance with a two-pass radix select (16 bits a pass)
over int32 keys that order like the floats, one tensor (in bounded slices) at a time: no concatenation, no
``torch.quantile`` (limited to 2^24 elements), and ties broken by position (tensor order, then flat index).
Without regrowth a pruned entry's key lies below every importance (even ``-inf``), so it stays pruned.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .masks import MaskedTensor, _divisor, keep_bits_cached

__all__ = [
    "IMPORTANCE",
    "Granularity",
    "Selection",
    "Selector",
    "TiedUnits",
    "kth_smallest",
    "parse_granularity",
]

_SLICE = 1 << 22
_CACHE_ELEMENTS = 1 << 23  # importance keys kept between passes (32 MiB of int32), not more
_RADIX_PASSES = ((16, 16), (0, 16))  # (shift, bits): 32 key bits, high to low
_PRUNED = -(1 << 31)  # int32 key of an entry that must stay pruned: below every float's key (-inf's included)
_PROTECTED = (1 << 31) - 1  # int32 key of an entry the layer floor keeps: above every float's key


def _at(tensor: Tensor, index: Optional[Tensor]) -> Tensor:
    """The whole unit-shaped ``tensor``, or its flat entries at ``index``."""
    return tensor if index is None else tensor.reshape(-1).index_select(0, index)


def _log_sigmoid(entry: MaskedTensor, index: Optional[Tensor] = None) -> Tensor:
    """Log of the raw gate ``sigmoid(scores / T)``: orders like the gate without saturating at 1."""
    gate = entry.gate
    divisor = _divisor(gate.temperature)  # None at T == 1: no division pass (dividing by 1 is exact anyway)
    scores = _at(gate.scores.detach(), index).float()
    return torch.nn.functional.logsigmoid(scores if divisor is None else scores / divisor)


def _gate_importance(entry: MaskedTensor, index: Optional[Tensor] = None) -> Tensor:
    """Log of the gate as the network applies it (rescaled when ``rescale_gate`` is on, per entry or per tensor)."""
    scale = entry.gate.gate_scale
    values = _log_sigmoid(entry, index)
    if scale is None:
        return values
    return values.add_((scale if scale.dim() == 0 else _at(scale, index)).float().log())


def _effective_weight_importance(entry: MaskedTensor, index: Optional[Tensor] = None) -> Tensor:
    """Log of ``|w * gate|``: the weight-dependent criterion (per channel, the channel's mean ``|w|``)."""
    weight = entry.weight.detach()
    if entry.unit_size > 1:
        magnitude = _at(weight.float().abs().reshape(entry.units, -1).mean(1).reshape(entry.gate.scores.shape), index)
    else:
        magnitude = _at(weight, index).float().abs()
    return magnitude.log_().add_(_gate_importance(entry, index))


#: Importance criteria: ``(masked tensor, index=None)`` -> float32 importance of each unit (the keep-mask's
#: shape), or of the flat units at ``index`` (selection skips the pruned ones); higher is kept first. A
#: criterion added here may take the masked tensor alone: it is then computed whole and indexed.
IMPORTANCE: dict[str, Callable[..., Tensor]] = {
    "gate": _gate_importance,
    "effective_weight": _effective_weight_importance,
}


@functools.cache
def _takes_index(criterion: Callable[..., Tensor]) -> bool:
    """Whether ``criterion`` accepts ``(entry, index)``."""
    try:
        inspect.signature(criterion).bind(None, None)
    except TypeError:
        return False
    return True


def _importance_at(name: str, entry: MaskedTensor, index: Optional[Tensor] = None) -> Tensor:
    """``IMPORTANCE[name]`` of the entry's units, or of its flat units at ``index``."""
    criterion = IMPORTANCE[name]
    if index is None:
        return criterion(entry)
    return criterion(entry, index) if _takes_index(criterion) else _at(criterion(entry), index)


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


def _keys32(values: Tensor) -> Tensor:
    """Map float32 values to int32 keys with the same order: :func:`_keys` minus 2^31, three int32 passes."""
    bits = values.float().contiguous().view(torch.int32)
    return (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)


def _mark_pruned(keys: Tensor, keep: Tensor) -> Tensor:
    """Set the keys of pruned entries (``keep`` False) to ``_PRUNED``, in place, with integer arithmetic."""
    kept = keep.reshape(-1).view(torch.uint8).to(torch.int32)  # 1 kept, 0 pruned (bool ops are slow on CPU)
    return keys.mul_(kept).add_(kept.sub_(1).bitwise_and_(_PRUNED))


def _high_digits(keys: Tensor, out: Tensor) -> Tensor:
    """Write ``(keys >> 16) + 2^15``, in [0, 2^16), into the int32 ``out``: the high half read as int16 where the
    layout allows (an int32 shift is several times slower on CPU)."""
    if sys.byteorder == "little" and keys.is_contiguous():
        out.copy_(keys.view(torch.int16)[1::2])
    else:
        torch.bitwise_right_shift(keys, 16, out=out)
    return out.add_(1 << 15)


def _histogram(pieces: Iterator[Tensor], digits: Callable[[Tensor, Tensor], Tensor], bins: int, size: int) -> Tensor:
    """Sum over ``pieces`` of the bincount of ``digits(piece, out)``, batched into one int32 buffer of up to
    ``size`` values per bincount (each bincount fills and adds a ``bins``-long histogram)."""
    hist = torch.zeros(bins, dtype=torch.int64)
    buffer, used = None, 0
    for piece in pieces:
        if buffer is not None and (used + piece.numel() > buffer.numel() or buffer.device != piece.device):
            hist += torch.bincount(buffer[:used], minlength=bins).cpu()
            used = 0
        if buffer is None or buffer.device != piece.device or piece.numel() > buffer.numel():
            buffer = torch.empty(max(size, piece.numel()), dtype=torch.int32, device=piece.device)
        digits(piece.reshape(-1), buffer[used:used + piece.numel()])
        used += piece.numel()
    if used:
        hist += torch.bincount(buffer[:used], minlength=bins).cpu()
    return hist


def _kth_key(pieces: Callable[[], Iterator[Tensor]], k: int, total: int | None = None) -> tuple[int, int, int]:
    """Return ``(key, below, equal)``: the k-th smallest int32 key (1-based) over everything ``pieces()`` yields,
    how many keys are smaller and how many equal it. ``pieces`` is called twice (once per radix pass); ``total``
    (their count, if known) sizes the digit buffer.

    Pass 1 histograms the high 16 bits; pass 2 the low 16 bits of the keys in the chosen bucket, the others
    clamped into two overflow bins (no boolean masks: integer clamps and bincounts only).
    """
    size = 1 << 16
    batch = min(_SLICE, total) if total else _SLICE
    cumulative = _histogram(pieces(), _high_digits, size, batch).cumsum(0)
    digit = int(torch.searchsorted(cumulative, k))
    if digit >= size:
        raise ValueError(f"cannot select {k} entries out of {int(cumulative[-1])}")
    below = int(cumulative[digit - 1]) if digit else 0
    base = (digit - (1 << 15)) << 16  # the smallest key of the bucket
    low = base - 1 if digit > 0 else base  # one overflow bin below the bucket, where a key can be below it
    high = base + size if digit < size - 1 else base + size - 1

    def offsets(piece: Tensor, out: Tensor) -> Tensor:
        return torch.clamp(piece, low, high, out=out).sub_(low)

    counts = _histogram(pieces(), offsets, high - low + 1, batch)
    bucket = counts[base - low:base - low + size]
    inside = bucket.cumsum(0)
    offset = int(torch.searchsorted(inside, k - below))
    return base + offset, below + (int(inside[offset - 1]) if offset else 0), int(bucket[offset])


def _top_positions(keys: Tensor, m: int) -> Tensor:
    """Flat indices of the ``m`` highest keys, ties broken towards later positions (the order selection keeps)."""
    cut = int(keys.kthvalue(keys.numel() - m + 1).values)
    above = (keys > cut).nonzero().view(-1)
    tied = (keys == cut).nonzero().view(-1)
    return torch.cat([above, tied[tied.numel() - (m - above.numel()):]])


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


@dataclass(eq=False)
class TiedUnits:
    """Masked tensors pruned together, unit by unit: one keep decision per unit, written to every member.

    E.g. the BatchNorms that all add into one residual stream: a stream channel is then zero in every
    block, so :func:`~lightning_masks.export.shrink` can remove it. A unit's importance is the sum of its
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


def _members(entry: Ranked) -> list[MaskedTensor]:
    return entry.members if isinstance(entry, TiedUnits) else [entry]


def _keep_of(entry: Ranked) -> Tensor:
    return entry.keep if isinstance(entry, TiedUnits) else entry.gate.keep


def _refuse_nan(entry: Ranked, *tensors: Tensor) -> None:
    """Raise, naming the tensor, if any of ``tensors`` holds NaN (``max`` propagates it: one reduction, no mask)."""
    if any(t.numel() and torch.isnan(t.max()) for t in tensors):
        raise ValueError(f"mask importance of {entry.name!r} is NaN: its weight or scores hold NaN; "
                         "lower the learning rate or check the model for a divergence")


def _set_keep(entry: Ranked, keep: Tensor, flipped: dict[str, Tensor]) -> None:
    """Write ``keep`` into the mask (every member's, for tied tensors), counting the bits that change."""
    for member in _members(entry):
        flipped[member.name] = torch.ne(member.gate.keep.reshape(-1), keep.reshape(-1)).count_nonzero()  # no int64 copy
        member.gate.set_keep(keep)


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
        tie: groups of globs on masked tensor names; the tensors of a group are pruned together, unit by
            unit (see :class:`TiedUnits`), e.g. ``[["stem.bn.weight", "stage1.*.bn2.weight"]]``. Members
            need the same number of units; not with N:M.
    """

    mode: str = "global"
    importance: str = "effective_weight"
    layer_floor: float = 0.25
    regrow: bool = False
    granularity: str = "element"
    tie: Sequence[Sequence[str]] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("global", "layer"):
            raise ValueError(f"mode must be 'global' or 'layer', got {self.mode!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {self.importance!r}; known criteria: {sorted(IMPORTANCE)}")
        if not 0.0 <= self.layer_floor <= 1.0:
            raise ValueError(f"layer_floor must be in [0, 1], got {self.layer_floor!r}; 0 disables the floor")
        grain = parse_granularity(self.granularity)
        if isinstance(self.tie, str) or any(isinstance(group, str) or not group or
                                            not all(isinstance(p, str) for p in group) for group in self.tie):
            raise ValueError(f"tie must be a list of groups, each a non-empty list of glob strings, got {self.tie!r}; "
                             "e.g. tie=[['stem.bn.weight', 'stage1.*.bn2.weight']]")
        object.__setattr__(self, "tie", tuple(tuple(group) for group in self.tie))
        if self.tie and grain.is_nm:
            raise ValueError(f"tie cannot be combined with N:M granularity ({self.granularity!r}): N:M keeps N of "
                             "every M inside each tensor; use 'element' or 'channel'")

    @property
    def grain(self) -> Granularity:
        return parse_granularity(self.granularity)

    def check(self, masked: Sequence[MaskedTensor]) -> None:
        """Raise if a tensor cannot take this granularity (N:M needs rows divisible by M), ``tie`` does not
        fit the masked tensors, or ``regrow`` meets compact gates."""
        m = self.grain.m
        compact = [entry.name for entry in masked if getattr(entry.gate, "compact", False)]
        if self.regrow and compact:
            raise ValueError(f"regrow=True needs the scores of pruned entries, but {compact[:4]} hold the keep bits in "
                             "their scores (compact gates, whose pruned scores are a sentinel); attach with "
                             "compact=False")
        for entry in masked:
            row = entry.weight[0].numel() if entry.weight.dim() > 1 else entry.numel
            if m and row % m:
                raise ValueError(f"{self.granularity} needs rows divisible by {m}, but {entry.name!r} of shape "
                                 f"{tuple(entry.weight.shape)} has rows of {row}; exclude it or pick another M")
        self.tied(masked)

    def tied(self, masked: Sequence[MaskedTensor]) -> list[Ranked]:
        """``masked`` with each ``tie`` group merged into one :class:`TiedUnits`, at its first member's place."""
        if not self.tie:
            return list(masked)
        group_of: dict[int, int] = {}
        for index, group in enumerate(self.tie):
            for pattern in group:
                matched = [entry for entry in masked if fnmatch.fnmatchcase(entry.name, pattern)]
                if not matched:
                    raise ValueError(f"tie pattern {pattern!r} matches no masked tensor; masked tensors: "
                                     f"{[entry.name for entry in masked][:12]}. Fix the glob or mask that tensor")
                for entry in matched:
                    if group_of.setdefault(id(entry), index) != index:
                        raise ValueError(f"{entry.name!r} is in two tie groups ({self.tie[group_of[id(entry)]]} and "
                                         f"{group}); a tensor can be tied in one group only")
        members: dict[int, list[MaskedTensor]] = {}
        ranked: list[Ranked] = []
        for entry in masked:
            index = group_of.get(id(entry))
            if index is None:
                ranked.append(entry)
            elif index in members:
                members[index].append(entry)
            else:
                members[index] = [entry]
                ranked.append(TiedUnits(members[index]))
        for group in members.values():
            if len({entry.units for entry in group}) > 1:
                raise ValueError("tied tensors need the same number of units, got " +
                                 ", ".join(f"{entry.name!r}: {entry.units}" for entry in group) +
                                 "; tie only tensors with as many channels (or elements) as each other")
        return ranked

    def _values(self, entry: Ranked, index: Optional[Tensor] = None) -> Tensor:
        """The importance of each unit (the keep-mask's shape; the flat units at ``index`` if given); for tied
        tensors, of their sum."""
        if not isinstance(entry, TiedUnits):
            return _importance_at(self.importance, entry, index)
        values = torch.stack([_importance_at(self.importance, member, index).reshape(-1) for member in _members(entry)])
        values = torch.logsumexp(values, 0)
        return values if index is not None else values.view(entry.members[0].gate.scores.shape)

    def _importance(self, entry: MaskedTensor) -> Tensor:
        values = _importance_at(self.importance, entry)
        _refuse_nan(entry, values)
        if not self.regrow:
            values = values.masked_fill(~entry.gate.keep, -math.inf)
        return values

    @torch.no_grad()
    def __call__(self, masked: Sequence[MaskedTensor], target: float) -> Selection:
        """Set every ``gate.keep`` for ``target`` sparsity."""
        with keep_bits_cached(masked):
            return self._call(masked, target)

    def _call(self, masked: Sequence[MaskedTensor], target: float) -> Selection:
        if self.grain.is_nm:
            flipped: dict[str, Tensor] = {}
            return Selection(sum(self._select_nm(entry, target, flipped) for entry in masked), None, flipped)
        ranked = self.tied(masked)
        if self.mode == "layer":
            each = [self._select([entry], target, floor=0.0) for entry in ranked]
            return Selection(sum(s.pruned for s in each), None, {k: v for s in each for k, v in s.flipped.items()})
        return self._select(ranked, target, floor=self.layer_floor)

    def _select(self, masked: Sequence[Ranked], target: float, floor: float) -> Selection:
        total = sum(entry.units for entry in masked)
        alive = [entry.units if self.regrow else int(_keep_of(entry).count_nonzero()) for entry in masked]
        count = max(round(target * total), total - sum(alive))
        floors = [min(math.ceil(floor * (1.0 - target) * entry.units), n) if floor > 0 else 0
                  for entry, n in zip(masked, alive)]
        if count > total - sum(floors):
            raise ValueError(
                f"target sparsity {target} needs {count} of {total} entries pruned, but layer_floor={floor} "
                f"keeps {sum(floors)}; lower layer_floor or the target"
            )
        flipped: dict[str, Tensor] = {}
        if count == 0:
            for entry in masked:
                _set_keep(entry, torch.ones_like(_keep_of(entry)), flipped)
            return Selection(0, None, flipped)
        # Without regrowth a mostly pruned tensor is ranked on its live units only (the pruned ones stay below
        # every key): importance, keys and histograms then cost a fraction of the tensor.
        ranked = {id(entry): _keep_of(entry).reshape(-1).nonzero().view(-1)
                  if not self.regrow and 2 * n <= entry.units else None for entry, n in zip(masked, alive)}
        key, keeps = self._cut(masked, count, ranked, {})
        if any(f and int(keep.count_nonzero()) < f for keep, f in zip(keeps, floors)):
            # The floor binds: protect each tensor's top entries and cut again. Where it does not, protecting
            # would change nothing (a tensor's kept entries are its top ones in the same order), so it is skipped.
            protected = {id(entry): _top_positions(self._keys(entry, ranked[id(entry)]), f)
                         for entry, f in zip(masked, floors) if f}
            key, keeps = self._cut(masked, count, ranked, protected)
        for entry, keep in zip(masked, keeps):
            _set_keep(entry, keep, flipped)
        return Selection(count, 0.0 if key == _PRUNED else math.exp(_key_value(key + (1 << 31))), flipped)

    def _keys(self, entry: Ranked, index: Optional[Tensor] = None) -> Tensor:
        """Flat int32 keys of the entry's importance, of its units at ``index`` if given (live ones); otherwise,
        without regrowth, pruned units get ``_PRUNED``."""
        values = self._values(entry, index)
        # Ranking live units only, still check the pruned ones: a NaN there reaches the output (NaN * 0 is NaN).
        unranked = [] if index is None else [t.detach() for m in _members(entry) for t in (m.weight, m.gate.scores)]
        _refuse_nan(entry, values, *unranked)
        keys = _keys32(values).reshape(-1)
        return keys if self.regrow or index is not None else _mark_pruned(keys, _keep_of(entry))

    def _cut(self, masked: Sequence[Ranked], count: int, ranked: dict[int, Optional[Tensor]],
             protected: dict[int, Tensor]) -> tuple[int, list[Tensor]]:
        """Prune the ``count`` lowest keys (ties by position); return the cut key and each tensor's new keep.

        ``ranked`` gives, per entry, the flat positions of the units it ranks (its live ones; ``None``: all);
        the others are pruned and count as the lowest keys. ``protected`` positions index the ranked units.
        """

        def keyed(entry: Ranked) -> Tensor:
            keys = self._keys(entry, ranked[id(entry)])
            if id(entry) in protected:
                keys[protected[id(entry)]] = _PROTECTED
            return keys

        cache = _BoundedCache()

        def pieces() -> Iterator[Tensor]:
            for entry in masked:
                yield from cache.get(entry, keyed).split(_SLICE)

        left_out = sum(entry.units - len(ranked[id(entry)]) for entry in masked if ranked[id(entry)] is not None)
        if count == left_out:  # only the pruned units go: nothing changes
            return _PRUNED, [_keep_of(entry).clone() for entry in masked]
        size = sum(entry.units if ranked[id(entry)] is None else len(ranked[id(entry)]) for entry in masked)
        key, below, equal = _kth_key(pieces, count - left_out, size)
        ties = count - left_out - below  # how many of the entries equal to the cut are pruned: the first ones
        keeps = []
        for entry in masked:
            keys = cache.get(entry, keyed)
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
            index = ranked[id(entry)]
            if index is not None:  # the ranked units are the live ones: prune the few that go, keep the rest
                pruned = index[~keep]
                keep = _keep_of(entry).reshape(-1).clone()
                keep[pruned] = False
            keeps.append(keep)
        return key, keeps

    def _select_nm(self, entry: MaskedTensor, target: float, flipped: dict[str, Tensor]) -> int:
        n, m = self.grain.n, self.grain.m
        per_group = round(min(target / self.grain.sparsity, 1.0) * (m - n))
        keep = torch.ones((entry.numel // m, m), dtype=torch.bool, device=entry.weight.device)
        if per_group:
            lowest = self._importance(entry).reshape(-1, m).topk(per_group, dim=1, largest=False).indices
            keep.scatter_(1, lowest, False)
        _set_keep(entry, keep.view(entry.gate.scores.shape), flipped)
        return per_group * (entry.numel // m)

    @torch.no_grad()
    def threshold(self, masked: Sequence[MaskedTensor], threshold: float) -> Selection:
        """Prune every entry whose raw gate ``sigmoid(scores / T)`` is below ``threshold``."""
        with keep_bits_cached(masked):
            return self._threshold(masked, threshold)

    def _threshold(self, masked: Sequence[MaskedTensor], threshold: float) -> Selection:
        pruned, flipped = 0, {}
        for entry in self.tied(masked):
            current = _keep_of(entry)
            keep = torch.ones_like(current)
            if threshold > 0:  # tied: a unit stays while any member's gate is at the threshold
                keep = torch.stack([(_log_sigmoid(m) >= math.log(threshold)).reshape(-1)
                                    for m in _members(entry)]).any(0).view_as(current)
            if not self.regrow:
                keep &= current
            _set_keep(entry, keep, flipped)
            pruned += int((~keep).sum())
        return Selection(pruned, threshold, flipped)
