"""Put the mask scores into the user's optimizers, with their own learning rate and weight decay if asked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch.optim import Optimizer

from ..masking.masks import MaskedTensor

__all__ = ["place_scores"]


def place_scores(optimizers: Sequence[Optimizer], schedulers: Sequence[Any], masked: Sequence[MaskedTensor],
                 lr: Optional[float] = None, weight_decay: Optional[float] = None, *, fuse: bool = True) -> None:
    """Put the mask scores in the optimizers: in a param group of their own when ``lr``/``weight_decay`` is set.

    A score goes to the optimizer holding it, else the one holding its weight, else the first. Scores
    the optimizers already train are left alone unless an own group is asked for. LR schedulers of an
    optimizer that gains a group get its base learning rate appended.

    With ``fuse`` (the default), a CPU ``Adam``/``AdamW`` param group that trains scores or masked weights and
    left the implementation to torch (``foreach=None, fused=None``) runs torch's fused kernel instead of its
    per-tensor loop: the same update up to float rounding. A pruned entry's gradient is exactly zero, in the
    scores and in the weight alike, and the loop's ``sqrt`` and division on the zero (later denormal) state
    it leaves take a slow path on some CPUs (9x for ``sqrt`` of zeros on this one): the loop's step on a
    90%-sparse LeNet-300-100 took 5x the dense one for the scores, and the weights' loop made a Lightning
    fit 1.43x the dense fit where the fused kernel makes it 1.04-1.11x (``benchmarks/README.md``).
    Groups with optimizer state already, or any tensor that is not a float32/float64/bfloat16 CPU one, are left as
    they are. Adam's moments take the dtype of their parameter: bfloat16 scores get bfloat16 moments (2 + 2 bytes).
    """
    if not optimizers or not masked:
        return
    _place(optimizers, schedulers, masked, lr, weight_decay)
    if fuse:
        _fuse_groups(optimizers, {id(t) for entry in masked for t in (entry.gate.scores, entry.weight)})


_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # the fused CPU kernel computes bfloat16 in float32


def _fuse_groups(optimizers: Sequence[Optimizer], masked: set[int]) -> None:
    """Switch the CPU Adam/AdamW groups holding scores or masked weights (ids in ``masked``) to ``fused=True``
    where that is safe (see place_scores)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        if "cpu" not in _get_fused_kernels_supported_devices():
            return
    except (ImportError, AttributeError):
        return
    for optimizer in optimizers:
        if type(optimizer) not in _FUSABLE:
            continue
        for group in optimizer.param_groups:
            params = group["params"]
            if not any(id(p) in masked for p in params):
                continue
            if group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable") \
                    or group.get("capturable"):
                continue
            if all(p.device.type == "cpu" and p.dtype in _FUSED_DTYPES and not p.is_sparse
                   and not optimizer.state.get(p) for p in params):
                group["fused"] = True


def _place(optimizers: Sequence[Optimizer], schedulers: Sequence[Any], masked: Sequence[MaskedTensor],
           lr: Optional[float], weight_decay: Optional[float]) -> None:
    def holder(param: torch.Tensor) -> Optional[tuple[int, dict]]:
        for index, optimizer in enumerate(optimizers):
            for group in optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    return index, group
        return None

    own_group = lr is not None or weight_decay is not None
    placement: dict[int, tuple[dict, list[torch.Tensor]]] = {}
    for entry in masked:
        scores = entry.gate.scores
        found = holder(scores)
        if found is not None and not own_group:
            continue
        index, source = found or holder(entry.weight) or (0, optimizers[0].param_groups[0])
        placement.setdefault(index, (source, []))[1].append(scores)
    moving = {id(s) for _, params in placement.values() for s in params}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in moving]
    for index, (source, params) in placement.items():
        group_lr = lr if lr is not None else source["lr"]
        decay = weight_decay if weight_decay is not None else source.get("weight_decay", 0.0)
        optimizers[index].add_param_group({"params": params, "lr": group_lr, "weight_decay": decay,
                                           "initial_lr": group_lr})
        for scheduler in schedulers:
            if getattr(scheduler, "optimizer", None) is optimizers[index] and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs.append(group_lr)
