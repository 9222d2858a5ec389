"""Loading a masked state dict: a plain model gets the masks its keys describe; a strict load is checked first.

The keys are read through :mod:`lightning_masks.masking.layout`, their one owner.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .gate import SCORE_DTYPES
from .kinds import channel_shape, output_axis, parametrization_list
from .layout import ORIGINAL, REQUIRED_FIELDS, group_mask_keys, mask_key
from .masks import attach, detach_entries
from .targets import is_masked, tensor_slots

__all__ = ["restore_masks_on_load"]


def restore_masks_on_load(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Let ``model.load_state_dict`` accept a masked state dict while ``model`` is plain, and check it.

    Before loading, tensors whose keys say they were masked (``<path>.parametrizations.<name>.original``
    beside ``...0.scores``) get a gate attached, with the saved scores' dtype and, where the saved ``gate_scale``
    is one scalar, a compact gate (a binary one where ``binary`` is saved); the load then fills scores, keep bits and
    temperature. A strict load whose mask tensors are missing or mis-shaped raises ``ValueError`` before anything is
    loaded.
    Returns the hook handle; call ``.remove()`` to stop.
    """
    return model._register_load_state_dict_pre_hook(_restore_masks, with_module=True)


def _restore_masks(module: nn.Module, state_dict: dict, prefix: str, metadata: dict, strict: bool, *args) -> None:
    """The load pre-hook of :func:`restore_masks_on_load` (a module-level function: a hooked model pickles)."""
    slots = {q: (m, tn, t) for q, _, m, tn, t in tensor_slots(module)}
    saved = group_mask_keys(state_dict, prefix)
    wanted: dict[tuple[bool, bool, torch.dtype | None], list[str]] = {}  # (per_channel, compact, dtype) -> tensors
    binary = [qualified for qualified, fields in saved.items() if "binary" in fields]
    for qualified, fields in saved.items():
        scores = fields.get("scores")
        if scores is None or qualified not in slots or is_masked(*slots[qualified][:2]):
            continue
        owner, tensor_name, original = slots[qualified]
        channels = channel_shape(original, output_axis(owner, tensor_name))
        per_channel = tuple(scores.shape) == channels != tuple(original.shape)
        scale = fields.get("gate_scale")
        compact = scale is not None and scale.dim() == 0
        dtype = scores.dtype if scores.dtype in SCORE_DTYPES else None
        wanted.setdefault((per_channel, compact, dtype), []).append(qualified)
    rescale = any("gate_scale" in fields for fields in saved.values())
    attached = [entry for (per_channel, compact, dtype), names in wanted.items()
                for entry in attach(module, names, init=torch.zeros_like, rescale=rescale, per_channel=per_channel,
                                    score_dtype=dtype, compact=compact, binary=binary)]
    try:
        if strict:
            _check_mask_keys(module, state_dict, prefix)
    except ValueError:
        detach_entries(attached)
        raise


def _check_mask_keys(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Raise if the state dict lacks, or mis-shapes, a mask tensor of ``model`` (before any is loaded)."""
    problems = []
    masked = {q for q, _, m, tn, _ in tensor_slots(model) if parametrize.is_parametrized(m, tn)}
    for target, fields in group_mask_keys(state_dict, prefix).items():
        if target not in masked:
            problems += [f"{prefix + mask_key(target, field)!r} is a mask tensor of a weight the model does not mask"
                         for field in fields]
    for qualified, _, module, tensor_name, tensor in tensor_slots(model):
        if not is_masked(module, tensor_name):
            continue
        gate = parametrization_list(module, tensor_name)[0]
        for field in REQUIRED_FIELDS:
            shape = (tensor if field == ORIGINAL else getattr(gate, field)).shape
            key = prefix + mask_key(qualified, field)
            value = state_dict.get(key)
            if value is None:
                problems.append(f"{key!r} is missing")
            elif tuple(value.shape) != tuple(shape):
                problems.append(f"{key!r} has shape {tuple(value.shape)}, the model has {tuple(shape)}")
    if problems:
        raise ValueError(
            f"the state dict does not match the model's masks ({len(problems)} problems: "
            f"{'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''}); nothing was loaded. Load a "
            "checkpoint written with the same model and mask targets, or fold it with fold_checkpoint first"
        )
