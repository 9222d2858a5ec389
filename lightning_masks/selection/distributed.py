"""Counting across shards: selection over tensors split between processes, exact without gathering them.

Within :func:`across_shards`, the selection (:mod:`~lightning_masks.selection.selector`, its radix select in
:mod:`~lightning_masks.selection.kth`) runs on each process's local shards of the masked tensors and sums what it
counts with an all-reduce: the radix histograms (two 2^16-bin passes), the per-tensor totals and live counts, and,
where the cut falls among equal keys, how many equal keys precede each shard. The cut, and so every keep bit, is
the one a single process would find on the whole tensors (ties broken by tensor order, then flat index: a dim-0
shard of rank ``r`` follows those of lower ranks, as FSDP2's ``Shard(0)`` lays them out), while no process holds
more than its shard. Outside the block every function here is the identity: one process counts alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["across_shards"]

_GROUP: Optional[list[Any]] = None  # [process group] while counting across shards


@contextmanager
def across_shards(group: Any = None) -> Iterator[None]:
    """Within the block, selection counts over the shards of every process of ``group`` (``None``: the default
    group). Every process must run the same selections in the same order (they meet in collectives)."""
    global _GROUP
    outer, _GROUP = _GROUP, [group]
    try:
        yield
    finally:
        _GROUP = outer


def active() -> bool:
    """Whether counts are being summed across shards."""
    return _GROUP is not None


def summed(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the processes (in place; a CPU int64 histogram or count vector)."""
    if _GROUP is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_GROUP[0])
    return tensor


def summed_counts(counts: Sequence[int]) -> list[int]:
    """Host counts (one per tensor) summed over the processes, in one all-reduce."""
    if _GROUP is None or not counts:
        return list(counts)
    return summed(torch.tensor(list(counts), dtype=torch.int64)).tolist()


def preceding(counts: Sequence[int]) -> list[int]:
    """For each tensor ``i``, how many of the counted keys lie before this process's shard of it in the global order
    (all of tensors ``< i``, on every process, then tensor ``i`` on lower ranks), from every process's ``counts``
    (one per tensor, the same tensors in the same order everywhere)."""
    if _GROUP is None:
        return [sum(counts[:i]) for i in range(len(counts))]
    group = _GROUP[0]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor(list(counts), dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every)  # (ranks, tensors)
    before_tensor = table.sum(0).cumsum(0) - table.sum(0)
    return (before_tensor + table[:rank].sum(0)).tolist()
