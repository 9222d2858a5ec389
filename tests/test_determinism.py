"""Same run, same result: the default update cadence is a function of the fit's configuration, never of timings.

Seeded fits repeat bit for bit however long their steps take (a busy machine, activation checkpointing's
recomputation); a resumed fit equals the uninterrupted one; a finished fit continued to a higher target re-plans its
ramp and reaches it; a fit that ends short of its target says so.
"""

import time

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, zeros_and_total
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.checkpoint import checkpoint

from lightning_masks import MaskPruningCallback, Schedule


class Slow(TinyModule):
    """The same model on a busy machine: each training step takes a few milliseconds longer."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.004)
        return super().training_step(batch, batch_idx)


class Checkpointed(TinyModule):
    """The same model with activation checkpointing: the forward is recomputed in backward."""

    def forward(self, x):
        return checkpoint(self.net, x, use_reentrant=False)


class Compiled(TinyModule):
    """The same model compiled (dynamo's tracing on the first steps makes them much longer; the eager backend runs
    the same kernels)."""

    def forward(self, x):
        if "_compiled" not in self.__dict__:  # not a submodule: the network is the same one
            self.__dict__["_compiled"] = torch.compile(self.net, backend="eager")
        return self.__dict__["_compiled"](x)


def fit(module_class=TinyModule, **options) -> tuple[list[torch.Tensor], list]:
    """A default seeded fit, deterministic; returns its final weights and the positions of its mask updates."""
    pl.seed_everything(0, verbose=False)
    module, pruner = module_class(), MaskPruningCallback(**options)
    make_trainer(max_epochs=10, deterministic=True, callbacks=[pruner]).fit(module)
    return [p.detach().clone() for p in module.parameters()], pruner.plan.history["positions"]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("other", [TinyModule, Slow, Checkpointed, Compiled],
                         ids=["again", "slower_steps", "checkpointing", "compiled"])
def test_seeded_default_fits_repeat_bit_for_bit_however_long_their_steps_take(other):
    weights, positions = fit()
    other_weights, other_positions = fit(other)
    assert positions == other_positions
    assert same(weights, other_weights)


def test_a_resumed_default_fit_equals_the_uninterrupted_one(tmp_path):
    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module, pruner = TinyModule(), MaskPruningCallback()
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        make_trainer(max_epochs=10, deterministic=True, callbacks=[pruner, saver],
                     enable_checkpointing=True).fit(module, ckpt_path=ckpt_path)
        return [p.detach().clone() for p in module.parameters()], pruner.plan.history["positions"]

    weights, positions = run()
    assert positions[-1] > 12  # the ramp goes on after the checkpoint of epoch 2 (step 12)
    resumed, resumed_positions = run(tmp_path / "epoch=2.ckpt")
    assert resumed_positions == positions and same(weights, resumed)


@pytest.mark.parametrize("budget", [None, 0.05], ids=["default", "update_budget"])
def test_a_finished_fit_continued_to_a_higher_target_replans_its_ramp_and_reaches_it(tmp_path, budget):
    def run(sparsity, max_epochs, ckpt_path=None):
        module = TinyModule()
        pruner = MaskPruningCallback(sparsity, schedule=Schedule(update_budget=budget))
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        make_trainer(max_epochs=max_epochs, callbacks=[pruner, saver], enable_checkpointing=True).fit(
            module, ckpt_path=ckpt_path)
        return module

    first = run(0.8, 6)
    pruned, total = zeros_and_total(first)
    assert pruned == round(0.8 * total)
    continued = run(0.9, 15, tmp_path / "last.ckpt")
    pruned, total = zeros_and_total(continued)
    assert pruned == round(0.9 * total)


def test_a_fit_that_ends_below_its_target_warns_with_the_target_and_the_reached_sparsity(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(max_epochs=6, callbacks=[MaskPruningCallback(0.8), saver], enable_checkpointing=True).fit(TinyModule())
    missed = r"no update left to reach the final target: target sparsity 0.9 \(reached 80\.\d+%\)"
    with pytest.warns(UserWarning, match=missed):  # the checkpoint ends the fit: no step left to prune more
        make_trainer(max_epochs=6, callbacks=[MaskPruningCallback(0.9)]).fit(TinyModule(),
                                                                             ckpt_path=tmp_path / "last.ckpt")
