"""Importance criteria: what mask selection ranks, and the registry that names them.

The registry follows the initializers' idiom (:mod:`lightning_masks.masking.initializers`, after timm's
``_registry.py``): :func:`register_importance` adds a criterion, :func:`get_importance` looks one up (a miss names the
registered ones), :func:`list_importances` lists them. A criterion maps a masked tensor to a float32 importance per unit
(the keep-mask's shape, or the flat units at ``index``: selection ranks only the live ones), in log scale so that
tied tensors can be summed with ``logsumexp``; higher is kept first. The strategies are small functions, as
Torch-Pruning's ``pruner/importance.py`` has small classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from ..masking import MaskedTensor, reduce_to, temperature_divisor
from ..registry import Registry

__all__ = ["list_importances", "register_importance"]

#: ``(masked tensor, index=None) -> float32 importance`` of its units, or of its flat units at ``index``.
Criterion = Callable[[MaskedTensor, Optional[Tensor]], Tensor]

_CRITERIA: Registry[Criterion] = Registry("importance")


def at(tensor: Tensor, index: Optional[Tensor]) -> Tensor:
    """The whole unit-shaped ``tensor``, or its flat entries at ``index``."""
    return tensor if index is None else tensor.reshape(-1).index_select(0, index)


def register_importance(name: str, *, indexed: bool = True, override: bool = False) -> Callable:
    """Register an importance criterion under ``name``; returns a decorator that returns it unchanged.

    Args:
        name: the name ``Selector(importance=...)`` takes.
        indexed: the criterion takes ``(entry, index=None)`` and computes only the units at ``index`` when given;
            ``False``: it takes the entry alone and is computed whole, then indexed.
        override: replace a criterion registered already.

    Raises:
        ValueError: ``name`` is registered already and ``override`` is False.

    Example:
        >>> @register_importance("magnitude_only", indexed=False)
        ... def magnitude_only(entry):
        ...     return entry.weight.detach().float().abs().log()
    """

    wrap = (lambda criterion: criterion) if indexed else (
        lambda criterion: lambda entry, index=None: at(criterion(entry), index))
    return _CRITERIA.decorator(name, override=override, wrap=wrap)


#: The registered criterion names, sorted.
list_importances = _CRITERIA.names
#: The criterion registered under a name; an unknown name raises ``ValueError`` listing the registered ones.
get_importance = _CRITERIA.get


def log_sigmoid(entry: MaskedTensor, index: Optional[Tensor] = None) -> Tensor:
    """Log of the raw gate ``sigmoid(scores / T)``: orders like the gate without saturating at 1."""
    gate = entry.gate
    divisor = temperature_divisor(gate.temperature)  # None at T == 1: no division pass (dividing by 1 is exact anyway)
    scores = at(gate.scores.detach(), index).float()
    return torch.nn.functional.logsigmoid(scores if divisor is None else scores / divisor)


@register_importance("gate")
def gate_importance(entry: MaskedTensor, index: Optional[Tensor] = None) -> Tensor:
    """Log of the gate as the network applies it (rescaled when ``rescale_gate`` is on, per entry or per tensor)."""
    scale = entry.gate.gate_scale
    values = log_sigmoid(entry, index)
    if scale is None:
        return values
    return values.add_((scale if scale.dim() == 0 else at(scale, index)).float().log())


@register_importance("effective_weight")
def effective_weight_importance(entry: MaskedTensor, index: Optional[Tensor] = None) -> Tensor:
    """Log of ``|w * gate|``, the weight-dependent criterion (per channel, the channel's mean ``|w|``); where the masks
    were initialised from input activations (the gate's ``input_norm``, set by ``init="wanda"``), of
    ``|w * gate| * ||x_j||``, Wanda's criterion on the effective weight (Sun et al. 2023)."""
    weight = entry.weight.detach()
    norm = entry.gate.input_norm
    if norm is not None:
        weight = weight.float() * norm  # a fresh float32 buffer of the weight's shape
    if entry.unit_size > 1:
        magnitude = at(reduce_to(weight.float().abs(), entry.gate.scores.shape), index)
    else:
        magnitude = at(weight, index).float().abs()
    return magnitude.log_().add_(gate_importance(entry, index))
