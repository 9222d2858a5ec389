"""What the callback reads from the Trainer, and runs on the user's module outside Lightning's loop: the strategy
check, the fit's length, the ``configure_model`` hook the masks attach after, one pass of the model to trace."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities import CombinedLoader

from ..masking import call_with
from ..selection import coupled_channels
from .sharding import check_model_parallel

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py


def check_strategy(strategy: Any) -> None:
    """Raise ``ValueError`` for a strategy whose sharding or wrapping the masks do not follow: a single device, DDP
    and FSDP2 through ``ModelParallelStrategy`` (without tensor parallelism) are supported."""
    if isinstance(strategy, ModelParallelStrategy):
        check_model_parallel(strategy)
        return
    unsupported = isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy))
    if unsupported or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"MaskPruningCallback does not support the {type(strategy).__name__} strategy: it shards or wraps "
            "parameters, which would give wrong masks. Use a single device, 'ddp', 'ddp_spawn', or FSDP2 through "
            "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with fully_shard in "
            "configure_model"
        )


def unbounded(trainer: pl.Trainer) -> bool:
    return trainer.max_epochs in (None, -1) and trainer.max_steps == -1


def training_length(trainer: pl.Trainer) -> tuple[float, float]:
    """Return ``(total steps, steps per epoch)`` of this fit, in the unit of :func:`step_clock`.

    In manual optimization Lightning's ``max_steps`` bounds ``global_step``, which counts every optimizer's steps:
    the fit is taken to step each of its optimizers once a batch (a GAN's generator and discriminator).
    """
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches) \
        if math.isfinite(trainer.num_training_batches) else math.inf
    by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
    by_steps = trainer.max_steps if trainer.max_steps != -1 else math.inf
    if not trainer.lightning_module.automatic_optimization:
        by_steps = math.ceil(by_steps / max(len(trainer.optimizers), 1)) if math.isfinite(by_steps) else by_steps
    total = min(by_epochs, by_steps)
    if not math.isfinite(per_epoch):
        per_epoch = total
    return total, max(per_epoch, 1)


def step_clock(trainer: pl.Trainer) -> int:
    """The steps the ramp counts: optimizer steps (``global_step``) in automatic optimization; in manual
    optimization, where ``global_step`` counts every optimizer's steps (two a batch in a GAN), the batches that
    stepped (the step Lightning's loggers use)."""
    if trainer.lightning_module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop._batches_that_stepped


@contextmanager
def _logging_disabled(pl_module: pl.LightningModule) -> Iterator[None]:
    """Make ``self.log``/``self.log_dict`` no-ops on a module for a block (a step run outside the loop)."""
    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    for name in ("log", "log_dict"):  # instance attributes over the methods (mypy refuses assigning to a method)
        setattr(pl_module, name, silent)
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def after_configure_model(pl_module: pl.LightningModule, then: Callable[[], None],
                          before: Optional[Callable[[], None]] = None) -> None:
    """Make the module's next ``configure_model`` call ``then()`` once it has run (and ``before()`` first, e.g. to
    mask the layers that exist already before ``configure_model`` shards them).

    Lightning builds layers in ``LightningModule.setup`` and ``configure_model`` after every callback's ``setup``,
    then restores the checkpoint, wraps the module (DDP) and creates the optimizers: masks attached right after
    ``configure_model`` see every layer and are in place for all of that. The wrapper is an instance attribute
    (so Lightning calls it even when the class does not override the hook) that removes itself when called.
    """
    def configure_model(build: Callable[[], None]) -> None:
        restore_configure_model(pl_module)
        if before is not None:
            before()
        build()
        then()

    _wrap_hook(pl_module, "configure_model", configure_model)


def restore_configure_model(pl_module: pl.LightningModule) -> None:
    """Remove the wrapper of :func:`after_configure_model`, if it is still there."""
    _unwrap_hook(pl_module, "configure_model")


def within_configure_optimizers(pl_module: pl.LightningModule, context: Callable[[], ContextManager]) -> None:
    """Run the module's next ``configure_optimizers`` within ``context()``; like :func:`after_configure_model`'s,
    the wrapper removes itself when called (a module holding it could not be pickled or copied faithfully)."""
    def configure_optimizers(build: Callable[[], Any]) -> Any:
        restore_configure_optimizers(pl_module)
        with context():
            return build()

    _wrap_hook(pl_module, "configure_optimizers", configure_optimizers)


def restore_configure_optimizers(pl_module: pl.LightningModule) -> None:
    """Remove the wrapper of :func:`within_configure_optimizers`, if it is still there."""
    _unwrap_hook(pl_module, "configure_optimizers")


def _wrap_hook(pl_module: pl.LightningModule, name: str, wrapper: Callable[..., Any]) -> None:
    """Make ``pl_module.<name>()`` call ``wrapper(the hook as it was)``, as an instance attribute that
    :func:`_unwrap_hook` removes, giving back an instance attribute that was there (LightningCLI sets one)."""
    _unwrap_hook(pl_module, name)
    previous, build = pl_module.__dict__.get(name), getattr(pl_module, name)

    def hook(*args: Any, **kwargs: Any) -> Any:
        return wrapper(lambda: build(*args, **kwargs))

    setattr(hook, "masks_previous", previous)  # read back by _unwrap_hook
    setattr(pl_module, name, hook)


def _unwrap_hook(pl_module: pl.LightningModule, name: str) -> None:
    hook = pl_module.__dict__.get(name)
    if hook is None or not hasattr(hook, "masks_previous"):
        return
    if hook.masks_previous is None:
        delattr(pl_module, name)
    else:
        setattr(pl_module, name, hook.masks_previous)


def first_batch(trainer: pl.Trainer) -> Any:
    """The first batch of the fit's training data (from the datamodule, the module or the loaders passed to fit)."""
    return next(training_batches(trainer, 1))


def training_batches(trainer: pl.Trainer, count: int) -> Iterator[Any]:
    """The first ``count`` batches of the fit's training data (fewer when an epoch has fewer)."""
    loaders = trainer.train_dataloader
    if loaders is None:  # before the fit loop set its data up (configure_model): no public way in but its source
        loaders = trainer.fit_loop._data_source.dataloader()
    for index, (batch, *_) in enumerate(CombinedLoader(loaders, "max_size_cycle")):
        if index == count:
            return
        yield batch


def one_pass(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Callable[[], Any]]:
    """One pass of the model to trace: ``forward(example_input_array)``, else the loss of the first training
    batch; ``None`` when neither can run (no example input, no training data)."""
    # Layers built in configure_model may already sit on the accelerator, the data does not yet.
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    example = pl_module.example_input_array
    if example is not None:
        return lambda: call_with(pl_module, move_data_to_device(example, device))
    try:
        batch = move_data_to_device(first_batch(trainer), device)
    except Exception:  # no training data reachable before fit: the caller warns
        return None

    return lambda: training_loss(pl_module, batch)


def training_loss(pl_module: pl.LightningModule, batch: Any) -> Any:
    """The loss of one ``training_step`` on ``batch``, run outside the loop (its ``self.log`` calls are no-ops)."""
    with _logging_disabled(pl_module):
        output = pl_module.training_step(batch, 0)
    return output["loss"] if isinstance(output, Mapping) else output


def coupled_norms(pl_module: pl.LightningModule) -> list[list[str]]:
    """The BatchNorm groups of ``tie="auto"``, traced on the module's ``example_input_array``."""
    example = pl_module.example_input_array
    if example is None:
        raise ValueError("tie='auto' traces the model on pl_module.example_input_array, which is not set; set it "
                         "to a batch the model's forward takes, or pass the groups (lightning_masks.selection.coupling."
                         "coupled_channels) as tie=[[...], ...]")
    return coupled_channels(pl_module, example)
