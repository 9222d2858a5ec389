"""Masks over the base weights of PEFT adapter layers (LoRA), without importing peft.

Under a PEFT model the base model is frozen and the adapters' factors train; masks go on the base weights (their
scores train) and the factors stay dense. A LoRA layer computes ``base(x) + x (B A)^T * scaling``; with its base
weight masked that would be ``x (W * G)^T + x dW^T`` (``G = sigmoid(scores / T) * keep``), whose merge
``W * G + dW`` fills the pruned entries back in. So the layer gets a forward hook that adds ``x (dW * G - dW)^T``:
it computes ``x ((W + dW) * G)^T``, the adapter's update masked by the same keep decision (``G`` as the gate takes it:
``keep`` for binary masks, the very patterns the base weight sampled under a relaxation) (with ``lora_dropout``
the hook's term sees the input before dropout, so the two agree exactly in eval mode and without dropout).
:func:`merge_under_masks` (run by :func:`~lightning_masks.masking.masks.fold`) writes ``W + dW`` into the base
weight before the fold multiplies by ``G``, and zeroes the factors' ``B``: the folded model computes what it trained
and peft's ``merge_and_unload()`` keeps the exact zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .gate import MaskGate
from .kinds import parametrization_list

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py

_TUNER_LAYER = "peft.tuners.tuners_utils.BaseTunerLayer"
_HOOK = "_masked_adapter_update_hook"  # the id of the layer's forward hook, on the layer


def _is_tuner_layer(module: nn.Module) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" == _TUNER_LAYER for cls in type(module).__mro__)


def _adapter_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The PEFT tuner layers of ``model`` (LoRA, IA3, ... layers wrapping a ``base_layer``)."""
    return (module for module in model.modules() if _is_tuner_layer(module))


def adapter_tensors(model: nn.Module) -> set[int] | None:
    """The ids of the adapters' own tensors (LoRA's ``lora_A``/``lora_B``, DoRA's magnitudes, ...): every parameter
    of a tuner layer outside its ``base_layer``; ``None`` when ``model`` holds no PEFT tuner layer."""
    layers = list(_adapter_layers(model))
    if not layers:
        return None
    base = {id(t) for layer in layers for t in _base_of(layer).parameters()}
    return {id(t) for layer in layers for t in layer.parameters() if id(t) not in base}


def _base_of(layer: nn.Module) -> nn.Module:
    tuner: Any = layer  # peft's attributes, untyped here
    return tuner.get_base_layer() if hasattr(tuner, "get_base_layer") else tuner.base_layer


def _gate_of(module: nn.Module) -> MaskGate | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in parametrization_list(module, "weight") if isinstance(p, MaskGate)), None)


def _delta(layer: nn.Module) -> Tensor | None:
    """The active adapters' summed update ``dW`` in the base weight's layout, or ``None`` when none applies."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    tuner: Any = layer  # peft's attributes, untyped here
    names = [name for name in tuner.active_adapters if name in getattr(tuner, "lora_A", {})]
    return sum(tuner.get_delta_weight(name) for name in names) if names else None


def hold_adapter_updates(model: nn.Module) -> None:
    """Give every LoRA layer of ``model`` whose base weight is masked the forward hook that masks its update.

    Raises:
        ValueError: a masked base under an adapter whose update is not ``B A`` (DoRA, or a non-LoRA tuner).
    """
    for layer in _adapter_layers(model):
        if _gate_of(_base_of(layer)) is None or hasattr(layer, _HOOK):
            continue
        if not hasattr(layer, "lora_A") or any(getattr(layer, "use_dora", {}).values()):
            raise ValueError(f"masking the base weight of a {type(layer).__name__} adapter layer is supported for "
                             "LoRA (not DoRA or other tuners): exclude its base_layer, or use LoRA without DoRA")
        setattr(layer, _HOOK, layer.register_forward_hook(_masked_update).id)
        gate = _gate_of(_base_of(layer))
        assert gate is not None  # checked above
        gate.shares_sample = True  # a relaxation's sample of the base weight masks the update too


def release_adapter_updates(model: nn.Module) -> None:
    """Remove the hooks of :func:`hold_adapter_updates` from layers whose base weight is no longer masked."""
    for layer in _adapter_layers(model):
        if hasattr(layer, _HOOK) and _gate_of(_base_of(layer)) is None:
            layer._forward_hooks.pop(getattr(layer, _HOOK), None)
            delattr(layer, _HOOK)


def _masked_update(layer: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    """Forward hook: add ``x (dW * G - dW)^T``, so that the layer computes ``x ((W + dW) * G)^T``."""
    gate = _gate_of(_base_of(layer))
    if gate is None or not gate.enabled:
        return None
    delta = _delta(layer)
    if delta is None:
        return None
    correction = gate.masked(delta) - delta  # binary, straight-through or sampled as the base weight is
    if getattr(layer, "fan_in_fan_out", False):  # the base weight is (in, out), as transformers' Conv1D
        correction = correction.T
    x = args[0]
    return output + F.linear(x.to(correction.dtype), correction).to(output.dtype)


@torch.no_grad()
def merge_under_masks(model: nn.Module) -> None:
    """Merge each active LoRA update into its masked base weight (``W <- W + dW``, before the mask is folded in) and
    zero the adapters' ``B`` factors, so that the folded model computes ``x ((W + dW) * G)^T`` with exact zeros."""
    for layer in _adapter_layers(model):
        base = _base_of(layer)
        if _gate_of(base) is None:
            continue
        delta = _delta(layer)
        if delta is None:
            continue
        original = parametrization_list(base, "weight").original
        original.add_(delta.to(original.dtype))
        tuner: Any = layer  # peft's attributes, untyped here
        for name in tuner.active_adapters:
            if name in tuner.lora_B:
                tuner.lora_B[name].weight.zero_()  # a lora_bias stays: it is added to the output, not to W
