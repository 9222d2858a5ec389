"""The callbacks and tools that run beside MaskPruningCallback: copies of the model that other callbacks hold,
tensors that finetuning callbacks freeze, and the process group of distributed workers."""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim.swa_utils import AveragedModel

from ..masking import MaskedTensor, follow_masks, mask_like, masked_tensors

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py


@contextmanager
def frozen_by_finetuning(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[list[torch.Tensor]]:
    """Within the block, the tensors that the Trainer's finetuning callbacks (``BaseFinetuning``) freeze are trainable.

    Which they are is asked of the callbacks themselves: with every tensor trainable, each callback's
    ``freeze_before_training`` runs (it freezes the same tensors as in its own ``setup``, which ran before or will
    run after this one). Yields those already frozen now; every tensor's ``requires_grad`` is restored after.
    """
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
    finetuners = [callback for callback in callbacks if isinstance(callback, BaseFinetuning)]
    params = list(pl_module.parameters()) if finetuners else []
    before = [param.requires_grad for param in params]
    for param in params:
        param.requires_grad_(True)
    for callback in finetuners:
        callback.freeze_before_training(pl_module)
    theirs = [not param.requires_grad for param in params]
    for param, trainable, frozen in zip(params, before, theirs):
        param.requires_grad_(trainable or frozen)
    try:
        yield [param for param, trainable, frozen in zip(params, before, theirs) if frozen and not trainable]
    finally:
        for param, trainable in zip(params, before):
            param.requires_grad_(trainable)


def refreeze(masked: list[MaskedTensor], thawed: list[torch.Tensor]) -> None:
    """Freeze the scores of masks on tensors a finetuning callback froze (its unfreezing trains them both)."""
    ids = {id(p) for p in thawed}
    for entry in masked:
        if id(entry.weight) in ids:
            entry.gate.scores.requires_grad_(False)


def mask_copies(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Keep the copies of ``pl_module`` that other callbacks hold (SWA's average model, an EMA's ``AveragedModel``)
    masked like it.

    A plain copy, made before the masks existed (StochasticWeightAveraging deep-copies the module in its ``setup``),
    gets copies of the masks, so that its parameters pair one to one with the masked module's again; a masked copy
    gets the module's current keep bits (it averages weights and scores, not the keep-masks).
    """
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
    copies = [candidate for callback in callbacks if callback is not pl_module
              for value in list(vars(callback).values()) for candidate in (value, getattr(value, "module", None))
              if isinstance(candidate, torch.nn.Module) and candidate is not pl_module]
    # The callbacks first: it runs at every mask update, and walking the module's tree is what costs (~0.3 ms on a
    # 2-layer transformer, a tenth of its update), where most fits hold no copy.
    if not copies or not masked_tensors(pl_module):
        return
    for candidate in copies:
        mask_like(candidate, pl_module) or follow_masks(candidate, pl_module)


_process_group_ends_at_exit = False


def end_process_group_at_exit() -> None:
    """Destroy the process group when the process exits.

    Lightning registers this at exit for NCCL only; a gloo group left alive keeps its native threads running into
    the interpreter's shutdown, where a spawned rank was seen to abort ("terminate called without an active
    exception", SIGABRT) on a loaded machine.
    """
    global _process_group_ends_at_exit
    if not _process_group_ends_at_exit and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_process_group)
        _process_group_ends_at_exit = True


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def warn_inner_copies(pl_module: pl.LightningModule, masked: list[MaskedTensor]) -> None:
    """Warn, naming them, about masked tensors inside a weight average the module keeps as a submodule (an EMA's
    ``AveragedModel``): they join the selection as tensors of their own, so the model proper ends off its target."""
    copies = [name for name, module in pl_module.named_modules() if isinstance(module, AveragedModel) and name]
    inside = [entry.name for entry in masked if any(entry.name.startswith(f"{name}.") for name in copies)]
    if inside:
        rank_zero_warn(f"lightning_masks: {len(inside)} masked tensors are inside a weight average the module keeps "
                       f"({', '.join(copies)}): {inside[:4]}{' ...' if len(inside) > 4 else ''}; they are pruned as "
                       f"tensors of their own, so the model ends off its target. Exclude them (exclude="
                       f"{[f'{name}.*' for name in copies]}) or keep the average in a callback, whose copies follow "
                       "the model's keep bits")
