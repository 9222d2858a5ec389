"""Copies of a masked model: give a plain copy the same masks, or a masked copy the model's keep bits."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .gate import ChannelBias, MaskGate
from .masks import MaskedTensor, gated_biases, make_picklable, masked_tensors

__all__ = ["follow_masks", "mask_like"]


def mask_like(replica: nn.Module, source: nn.Module) -> list[MaskedTensor]:
    """Give ``replica``, a plain copy of ``source`` made before its masks (e.g. SWA's average model), the same masks.

    Each masked tensor of ``source`` gets a copy of its gate (scores, keep, temperature, scale) on the same place of
    ``replica``, in the same order, so that ``replica.parameters()`` pairs one to one with ``source.parameters()``.
    Returns ``replica``'s masked tensors; ``[]`` (``replica`` untouched) when it is masked already or is not a copy of
    ``source`` (another type, or a masked tensor's place missing or holding other values: a distillation teacher of
    the same class is left alone).
    """
    if type(replica) is not type(source) or masked_tensors(replica):
        return []
    names = {id(m): n for n, m in source.named_modules(remove_duplicate=False)}

    def place(module: nn.Module) -> nn.Module | None:
        try:
            return replica.get_submodule(names[id(module)])
        except AttributeError:
            return None

    places: list[tuple[MaskGate, list[tuple[nn.Module, str]], list[tuple[nn.Module, str]]]] = []
    for entry in masked_tensors(source):
        found = [(place(m), tn) for m, tn in entry.owners]
        placed = [(m, tn) for m, tn in found if m is not None and _same_values(getattr(m, tn, None), entry.weight)]
        if len(placed) < len(found):
            return []
        # the biases' modules are owners, placed above
        biases = [(m, name) for m, name in ((place(o), name) for o, name in gated_biases(entry)) if m is not None]
        places.append((entry.gate, placed, biases))
    for gate, owners, biases in places:
        gate = copy.deepcopy(gate)
        for module, tensor_name in owners:
            parametrize.register_parametrization(module, tensor_name, gate)
            make_picklable(module)
        for module, name in biases:
            parametrize.register_parametrization(module, name, ChannelBias(gate))
    return masked_tensors(replica)


def _same_values(tensor: object, weight: Tensor) -> bool:
    return (isinstance(tensor, Tensor) and tensor.shape == weight.shape
            and torch.equal(tensor.detach().to(weight.device), weight.detach()))


def follow_masks(replica: nn.Module, source: nn.Module) -> bool:
    """Copy ``source``'s keep bits into ``replica``, a masked copy of it (one made during fit keeps that moment's).

    Returns whether ``replica`` is such a copy (the same type, masked tensors at the same places, same shapes).
    """
    if replica is source or type(replica) is not type(source):
        return False
    theirs, mine = masked_tensors(replica), masked_tensors(source)
    if [e.name for e in theirs] != [e.name for e in mine] or any(
            a.gate.keep_bits.shape != b.gate.keep_bits.shape for a, b in zip(theirs, mine)):
        return False
    with torch.no_grad():
        for copied, entry in zip(theirs, mine):
            if copied.gate.keep_bits is not entry.gate.keep_bits:
                copied.gate.keep_bits.copy_(entry.gate.keep_bits)
    return bool(mine)
