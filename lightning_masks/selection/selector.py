"""Scores -> keep-masks: exact counts, global or per layer, element or N:M, without a model-sized copy.

Global selection finds the exact k-th smallest importance with :mod:`lightning_masks.selection.kth`'s radix select over
int32 keys that order like the floats, one tensor (in bounded slices) at a time, or, while all the keys fit
``ranked.CACHE_ELEMENTS`` (32 MiB), in one buffer (:class:`~lightning_masks.selection.ranked.Keys`; a small model's
update is then a few operations, not a few per tensor): no model-sized concatenation, no ``torch.quantile`` (limited to
2^24 elements), and ties broken by position (tensor order, then flat index).
Without regrowth a pruned entry's key lies below every importance (even ``-inf``), so it stays pruned.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..masking import GumbelPatterns, MaskedTensor, keep_bits_cached, nonzero_counts, undeclared_layout
from .distributed import summed_counts
from .importance import get_importance, list_importances, log_sigmoid
from .kth import PRUNED, key_value, kth_key
from .ranked import Keys, Ranked, TiedUnits, keep_of, members, refuse_nan, set_keep, top_of

__all__ = ["Selector"]


def _relaxation(spec: Union[GumbelPatterns, str, dict, None], granularity: object) -> Optional[GumbelPatterns]:
    """``relaxation`` as a :class:`GumbelPatterns` (``"gumbel"``: its defaults; a mapping: its fields) or ``None``;
    raises ``ValueError`` for anything else, or for a relaxation without N:M granularity."""
    if spec is None:
        return None
    if spec == "gumbel":
        spec = GumbelPatterns()
    elif isinstance(spec, dict):
        spec = GumbelPatterns(**spec)
    if not isinstance(spec, GumbelPatterns):
        raise ValueError(f"relaxation must be None, 'gumbel' or a lightning_masks.GumbelPatterns, got {spec!r}; "
                         "e.g. Selector(granularity='2:4', relaxation=GumbelPatterns(temperature=(4.0, 0.1)))")
    grain = parse_granularity(granularity) if isinstance(granularity, str) else None
    if grain is None or not grain.is_nm:
        raise ValueError(f"relaxation={spec!r} learns the choice among each group's N:M patterns, but granularity is "
                         f"{granularity!r}: pass an N:M granularity, e.g. Selector(granularity='2:4', "
                         "relaxation='gumbel')")
    return spec


class Selection(NamedTuple):
    """What one mask update did: the entries now pruned, the cut, and the keep bits it flipped.

    ``threshold`` is the importance of the last pruned entry in linear scale (``|w * gate|`` or the gate)
    for global selection, the gate threshold for threshold schedules, and ``None`` where each tensor
    has its own cut (per layer, N:M) or nothing was pruned. ``flips`` maps each tensor's name to the
    number of its keep bits this update changed (0-dim tensors on its device: no host sync).
    """

    pruned: int
    threshold: Optional[float]
    flips: dict[str, Tensor]


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
        mode: ``"global"`` ranks all masked tensors together; ``"layer"`` prunes each to the target; ``"row"``
            prunes each output unit (a Linear's row) to the target, Wanda's comparison group (Sun et al. 2023,
            https://arxiv.org/abs/2306.11695: per-output ranking prunes LLMs better than per-layer). Element
            granularity only.
        importance: a registered criterion (:func:`~lightning_masks.selection.importance.list_importances`):
            ``"gate"`` or the weight-dependent ``"effective_weight"``.
        layer_floor: in global mode every tensor keeps at least ``ceil(layer_floor * (1 - target) * units)``
            entries, a fraction of what a uniform split would give it, so no layer is wiped out. 0 disables.
        regrow: let pruned entries come back when their importance rises; off, pruned stays pruned.
        straight_through: pruned entries' scores keep learning, their gradient taken as if they were kept
            (the straight-through estimator of movement pruning, Sanh et al. 2020:
            :func:`~lightning_masks.masking.masks.straight_through_gated`), so a pruned weight whose gate the loss
            raises can come back. Needs ``regrow=True``.
        granularity: ``"element"``, ``"channel"`` or ``"N:M"``. Counts are in masked units: weights, or
            output channels.
        tie: groups of globs on masked tensor names; the tensors of a group are pruned together, unit by
            unit (see :class:`TiedUnits`), e.g. ``[["stem.bn.weight", "stage1.*.bn2.weight"]]``. Members
            need the same number of units; not with N:M. ``"auto"``: the groups
            :class:`~lightning_masks.MaskPruningCallback` traces at setup (it replaces this with them).
        relaxation: with N:M granularity, a :class:`~lightning_masks.masking.patterns.GumbelPatterns` (or
            ``"gumbel"`` for its defaults): each group's pattern is learned as MaskLLM learns it, sampled in training
            through a Gumbel-softmax over the group's ``C(M, N)`` patterns, the masks binary otherwise. Each update
            then keeps the most probable pattern, each group's N highest scores, whatever ``importance`` says (a
            pattern's logit is the sum of its scores); pruned entries come back when their scores rise, as with
            ``regrow``. ``None`` (the default): the N:M selection ranks ``importance`` and the gate is the sigmoid.

    Example:
        >>> Selector(mode="layer", granularity="channel").grain.channel
        True
    """

    mode: str = "global"
    importance: str = "effective_weight"
    layer_floor: float = 0.25
    regrow: bool = False
    granularity: str = "element"
    tie: Union[str, Sequence[Sequence[str]]] = ()
    straight_through: bool = False
    relaxation: Union[GumbelPatterns, str, None] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "relaxation", _relaxation(self.relaxation, self.granularity))
        if self.mode not in ("global", "layer", "row"):
            raise ValueError(f"mode must be 'global', 'layer' or 'row', got {self.mode!r}")
        if self.importance not in list_importances():
            raise ValueError(f"unknown importance {self.importance!r}; known criteria: {list_importances()}. Add one "
                             "with lightning_masks.selection.importance.register_importance")
        if isinstance(self.layer_floor, bool) or not isinstance(self.layer_floor, (int, float)) or \
                not 0.0 <= self.layer_floor <= 1.0:
            raise ValueError(f"layer_floor must be in [0, 1], got {self.layer_floor!r}; 0 disables the floor")
        grain = parse_granularity(self.granularity) if isinstance(self.granularity, str) else None
        if grain is None:
            raise ValueError(f"granularity must be a string ('element', 'channel' or 'N:M'), got {self.granularity!r}")
        if self.mode == "row" and (grain.channel or grain.is_nm):
            raise ValueError(f"mode='row' prunes each output unit's weights, so it needs granularity='element', got "
                             f"{self.granularity!r}; N:M is per row already, and channels are rows themselves")
        for flag in ("regrow", "straight_through"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.straight_through and not self.regrow:
            raise ValueError("straight_through=True needs regrow=True: without regrowth a pruned entry never comes "
                             "back, and its scores' gradients would change nothing")
        if self.tie and self.mode == "row":
            raise ValueError(f"tie={self.tie!r} prunes tensors together unit by unit, but mode='row' prunes each "
                             "output unit of each tensor on its own: use mode='global' or 'layer' with tie, or drop "
                             "tie")
        if self.tie == "auto":
            return
        if isinstance(self.tie, str) or any(isinstance(group, str) or not group or
                                            not all(isinstance(p, str) for p in group) for group in self.tie):
            raise ValueError(f"tie must be 'auto' or a list of groups, each a non-empty list of glob strings, got "
                             f"{self.tie!r}; e.g. tie=[['stem.bn.weight', 'stage1.*.bn2.weight']]")
        object.__setattr__(self, "tie", tuple(tuple(group) for group in self.tie))
        if self.tie and grain.is_nm:
            raise ValueError(f"tie cannot be combined with N:M granularity ({self.granularity!r}): N:M keeps N of "
                             "every M inside each tensor; use 'element' or 'channel'")

    @property
    def regrows(self) -> bool:
        """Whether pruned entries may come back: ``regrow``, or a relaxation (each update keeps the most probable
        pattern)."""
        return self.regrow or self.relaxation is not None

    @property
    def grain(self) -> Granularity:
        return parse_granularity(self.granularity)

    @property
    def auto_tie(self) -> bool:
        """Whether the tie groups are still to be traced (``tie="auto"``)."""
        return self.tie == "auto"

    def check(self, masked: Sequence[MaskedTensor]) -> None:
        """Raise if a tensor cannot take this granularity (N:M needs rows divisible by M along a declared output
        axis: :func:`~lightning_masks.masking.kinds.undeclared_layout`) or ``tie`` does not fit the masked tensors."""
        m = self.grain.m
        for entry in masked:
            undeclared = undeclared_layout(entry.name, entry.owners, tuple(entry.weight.shape), self.granularity)
            if m and undeclared:
                raise ValueError(undeclared)
            row = entry.numel // entry.weight.shape[entry.axis] if entry.weight.dim() > 1 else entry.numel
            if m and row % m:
                raise ValueError(f"{self.granularity} needs rows divisible by {m}, but {entry.name!r} of shape "
                                 f"{tuple(entry.weight.shape)} has rows of {row}; exclude it or pick another M")
        self.tied(masked)

    def tied(self, masked: Sequence[MaskedTensor]) -> list[Ranked]:
        """``masked`` with each ``tie`` group merged into one :class:`TiedUnits`, at its first member's place."""
        if self.auto_tie:
            raise ValueError("tie='auto' is traced by MaskPruningCallback at setup; outside it, pass the groups "
                             "(lightning_masks.selection.coupling.coupled_channels)")
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
            tied = group_of.get(id(entry))
            if tied is None:
                ranked.append(entry)
            elif tied in members:
                members[tied].append(entry)
            else:
                members[tied] = [entry]
                ranked.append(TiedUnits(members[tied]))
        for entries in members.values():
            if len({entry.units for entry in entries}) > 1:
                raise ValueError("tied tensors need the same number of units, got " +
                                 ", ".join(f"{entry.name!r}: {entry.units}" for entry in entries) +
                                 "; tie only tensors with as many channels (or elements) as each other")
        return ranked

    def _values(self, entry: Ranked, index: Optional[Tensor] = None) -> Tensor:
        """The importance of each unit (the keep-mask's shape; the flat units at ``index`` if given); for tied
        tensors, of their sum."""
        if not isinstance(entry, TiedUnits):
            return get_importance(self.importance)(entry, index)
        values = torch.stack([get_importance(self.importance)(member, index).reshape(-1) for member in members(entry)])
        values = torch.logsumexp(values, 0)
        return values if index is not None else values.view(entry.members[0].gate.scores.shape)

    def _importance(self, entry: MaskedTensor) -> Tensor:
        values = get_importance(self.importance)(entry, None)
        refuse_nan(entry, values)
        if not self.regrow:
            values = values.masked_fill(~entry.gate.keep, -math.inf)
        return values

    @staticmethod
    def _pattern_logits(entry: MaskedTensor) -> Tensor:
        """Each entry's share of its patterns' logits under a relaxation: its score."""
        scores = entry.gate.scores.detach().float()
        refuse_nan(entry, scores)
        return scores

    @torch.no_grad()
    def __call__(self, masked: Sequence[MaskedTensor], target: float) -> Selection:
        """Set every ``gate.keep`` for ``target`` sparsity."""
        with keep_bits_cached(masked):
            return self._call(masked, target)

    def _call(self, masked: Sequence[MaskedTensor], target: float) -> Selection:
        if self.grain.is_nm or self.mode == "row":
            flips: dict[str, Tensor] = {}
            select = self._select_nm if self.grain.is_nm else self._select_rows
            pruned = summed_counts([select(entry, target, flips) for entry in masked])
            return Selection(sum(pruned), None, flips)
        ranked = self.tied(masked)
        if self.mode == "layer":
            each = [self._select([entry], target, floor=0.0) for entry in ranked]
            return Selection(sum(s.pruned for s in each), None, {k: v for s in each for k, v in s.flips.items()})
        return self._select(ranked, target, floor=self.layer_floor)

    def _select(self, masked: Sequence[Ranked], target: float, floor: float) -> Selection:
        # Counts over every process's shards (distributed.across_shards); each process decides on its own shard.
        units, local_alive = [entry.units for entry in masked], nonzero_counts([keep_of(entry) for entry in masked])
        counted = summed_counts(units + local_alive)
        units, alive = counted[:len(masked)], counted[len(masked):]
        live_only = [not self.regrow and 2 * n <= n_units for n, n_units in zip(alive, units)]  # same on every shard
        total = sum(units)
        alive = units if self.regrow else alive
        count = max(round(target * total), total - sum(alive))
        floors = [min(math.ceil(floor * (1.0 - target) * n_units), n) if floor > 0 else 0
                  for n_units, n in zip(units, alive)]
        if count > total - sum(floors):
            raise ValueError(
                f"target sparsity {target} needs {count} of {total} entries pruned, but layer_floor={floor} "
                f"keeps {sum(floors)}; lower layer_floor or the target"
            )
        flips: dict[str, Tensor] = {}
        if count == 0:
            for entry, n in zip(masked, local_alive):
                if self.regrow or n < entry.units or isinstance(entry, TiedUnits):
                    set_keep(entry, torch.ones_like(keep_of(entry)), flips)
                else:  # all kept already (a fit's first update): nothing to write
                    flips[entry.name] = torch.zeros((), dtype=torch.int64, device=entry.gate.scores.device)
            return Selection(0, None, flips)
        # Without regrowth a mostly pruned tensor is ranked on its live units only (the pruned ones stay below
        # every key): importance, keys and histograms then cost a fraction of the tensor.
        # The choice is made on the counts over every shard, so that each process issues the same collectives.
        ranked = {id(entry): keep_of(entry).reshape(-1).nonzero().view(-1) if live else None
                  for entry, live in zip(masked, live_only)}
        sizes = [entry.units if (index := ranked[id(entry)]) is None else len(index) for entry in masked]
        keys = Keys(masked, sizes, lambda entry: self._ranked_values(entry, ranked[id(entry)]),
                     lambda entry: None if self.regrow or ranked[id(entry)] is not None else keep_of(entry))
        key, keeps = self._cut(masked, count, ranked, keys)
        kept = summed_counts(nonzero_counts(keeps)) if any(floors) else []
        if any(f and n < f for n, f in zip(kept, floors)):
            # The floor binds: protect each tensor's top entries and cut again. Where it does not, protecting
            # would change nothing (a tensor's kept entries are its top ones in the same order), so it is skipped.
            keys.protect({id(entry): top_of(keys.of(entry), f) for entry, f in zip(masked, floors) if f})
            key, keeps = self._cut(masked, count, ranked, keys)
        for entry, keep in zip(masked, keeps):
            set_keep(entry, keep, flips)
        return Selection(count, 0.0 if key == PRUNED else math.exp(key_value(key)), flips)

    def _ranked_values(self, entry: Ranked, index: Optional[Tensor]) -> Tensor:
        """The flat float32 importance of the entry's units at ``index`` (its live ones), or of all of them."""
        if index is not None:  # ranking live units only, still check the pruned ones: NaN * 0 is NaN in the output
            refuse_nan(entry, *[t.detach() for m in members(entry) for t in (m.weight, m.gate.scores)])
        return self._values(entry, index).reshape(-1)

    def _cut(self, masked: Sequence[Ranked], count: int, ranked: dict[int, Optional[Tensor]],
             keys: Keys) -> tuple[int, list[Tensor]]:
        """Prune the ``count`` lowest keys (ties by position); return the cut key and each tensor's new keep.

        ``ranked`` gives, per entry, the flat positions of the units it ranks (its live ones; ``None``: all);
        the others are pruned and count as the lowest keys. ``keys`` are those of the ranked units.
        """
        left_out = sum(summed_counts([entry.units - len(index) for entry in masked
                                      if (index := ranked[id(entry)]) is not None]))
        if count == left_out:  # only the pruned units go: nothing changes
            return PRUNED, [keep_of(entry).clone() for entry in masked]
        key, below, equal = kth_key(keys.pieces, count - left_out, keys.size)
        keeps = []
        for entry, keep in zip(masked, keys.above(key, count - left_out - below, equal)):
            index = ranked[id(entry)]
            if index is not None:  # the ranked units are the live ones: prune the few that go, keep the rest
                pruned = index[~keep]
                keep = keep_of(entry).reshape(-1).clone()
                keep[pruned] = False
            keeps.append(keep)
        return key, keeps

    def _select_nm(self, entry: MaskedTensor, target: float, flips: dict[str, Tensor]) -> int:
        """Keep N of every M consecutive weights of each output unit (groups run along the input axes)."""
        n, m, sparsity = self.grain.n, self.grain.m, self.grain.sparsity
        assert sparsity is not None  # an N:M grain
        return self._select_groups(entry, m, round(min(target / sparsity, 1.0) * (m - n)), flips)

    def _select_rows(self, entry: MaskedTensor, target: float, flips: dict[str, Tensor]) -> int:
        """Prune ``target`` of each output unit's weights (``mode="row"``); a 1-D tensor (a norm's scale, a bias: one
        entry per output unit) is one row, not one row per entry, which a target >= 1/2 would prune whole."""
        row = entry.numel // entry.weight.shape[entry.unit_axis] if entry.weight.dim() > 1 else entry.numel
        return self._select_groups(entry, row, round(target * row), flips)

    def _select_groups(self, entry: MaskedTensor, m: int, per_group: int, flips: dict[str, Tensor]) -> int:
        """Prune the ``per_group`` least important of every ``m`` consecutive entries of each output unit (the
        groups run along the input axes); return the number pruned."""
        axis = entry.unit_axis
        shape = list(entry.gate.scores.shape)
        rows = [shape.pop(axis), *shape]  # output units first: a group never spans two of them
        keep = torch.ones((entry.numel // m, m), dtype=torch.bool, device=entry.weight.device)
        if per_group:
            # under a relaxation the most probable pattern: a pattern's logit is the sum of its scores
            importance = self._pattern_logits(entry) if self.relaxation else self._importance(entry)
            importance = importance.movedim(axis, 0).reshape(-1, m)
            keep.scatter_(1, importance.topk(per_group, dim=1, largest=False).indices, False)
        keep = keep.view(rows).movedim(0, axis)
        if self.regrows:
            set_keep(entry, keep, flips)
            return per_group * (entry.numel // m)
        keep &= keep_of(entry)  # pruned stays pruned (e.g. a one-shot mask the masks started from)
        set_keep(entry, keep, flips)
        return entry.numel - int(keep.sum())

    @torch.no_grad()
    def threshold(self, masked: Sequence[MaskedTensor], threshold: float) -> Selection:
        """Prune every entry whose raw gate ``sigmoid(scores / T)`` is below ``threshold``."""
        with keep_bits_cached(masked):
            return self._threshold(masked, threshold)

    def _threshold(self, masked: Sequence[MaskedTensor], threshold: float) -> Selection:
        pruned, flips = 0, dict[str, Tensor]()
        for entry in self.tied(masked):
            current = keep_of(entry)
            keep = torch.ones_like(current)
            if threshold > 0:  # tied: a unit stays while any member's gate is at the threshold
                keep = torch.stack([(log_sigmoid(m) >= math.log(threshold)).reshape(-1)
                                    for m in members(entry)]).any(0).view_as(current)
            if not self.regrow:
                keep &= current
            set_keep(entry, keep, flips)
            pruned += int((~keep).sum())
        return Selection(summed_counts([pruned])[0], threshold, flips)
