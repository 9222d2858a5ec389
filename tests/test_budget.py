"""The opt-in update budget of update_every="auto": updates spaced by their measured cost."""

import math
import time

import pytest
import torch
from helpers import TinyModule, make_trainer, zeros_and_total
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_masks import MaskPruningCallback, Schedule, Selector, register_importance
from lightning_masks.lifecycle.budget import UpdateBudget
from lightning_masks.lifecycle.plan import MIN_RAMP_UPDATES
from lightning_masks.selection import importance as importance_module
from lightning_masks.selection.importance import effective_weight_importance


def test_the_interval_keeps_updates_within_their_share():
    budget = UpdateBudget(0.05)
    assert budget.interval(3) == 3  # nothing measured yet
    for _ in range(4):
        budget.add_step(0.010)
    budget.add_update(0.004)
    budget.add_update(0.006)  # the latest, 6 ms, above the mean against 10 ms steps, planning for 3%:
    assert budget.interval(1) == 20 and budget.interval(26) == 26  # 0.006 * 0.97 / (0.03 * 0.010) = 19.4
    every = budget.interval(1)
    assert 0.006 / (0.006 + every * 0.010) <= 0.03 < 0.006 / (0.006 + (every - 1) * 0.010)
    budget.add_update(0.002)  # cheaper again: the mean, 4 ms, is the larger
    assert budget.interval(1) == 13


def test_in_a_fit_of_known_length_the_updates_made_count_against_the_budget():
    budget = UpdateBudget(0.05)
    for _ in range(10):
        budget.add_step(0.010)
    budget.add_update(0.005)
    fresh = budget.interval(1, total=1000, done=10)
    budget.add_update(0.200, measured=False)  # a costly first update, spent but not in the mean
    late = budget.interval(1, total=1000, done=10)
    assert budget.update_seconds / budget.updates == 0.005 and late > fresh
    allowed = (0.03 / 0.97 * 1000 * 0.010 - 0.205) / 0.005  # seconds left of the fit's budget, in updates
    assert late == math.ceil(990 / allowed)
    spent = 0.205 + 0.005 * (990 // late)  # what the fit spends at that interval: within the planned 3%
    assert spent / (spent + 1000 * 0.010) <= 0.03
    budget.add_update(1.0, measured=False)  # more than the whole fit's budget: no update left to make
    assert budget.interval(1, total=1000, done=10) > 1000


def test_the_first_steps_one_off_costs_leave_the_step_estimate_once_a_second_step_is_in():
    budget = UpdateBudget(0.05)
    budget.add_step(0.020)  # the fit's first step: allocations, kernel choice, the loader's start
    budget.add_update(0.004)
    alone = budget.interval(1, total=50, done=1)  # the first step is all there is: it stands for the rest
    assert alone == math.ceil(49 / ((0.03 / 0.97 * 50 * 0.020 - 0.004) / 0.004))
    budget.add_step(0.010)
    later = budget.interval(1, total=50, done=2)
    assert later == math.ceil(48 / ((0.03 / 0.97 * 50 * 0.010 - 0.004) / 0.004)) > alone
    assert budget.state_dict()["first_step_seconds"] == 0.020


def test_the_interval_is_decided_again_as_the_step_estimate_settles():
    budget = UpdateBudget(0.05)
    settles = []
    for step in range(1, 40):
        budget.add_step(0.010)
        settles.append(budget.settling())
    assert [step for step, now in enumerate(settles, start=1) if now] == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 2])
def test_the_share_is_checked(share):
    with pytest.raises(ValueError, match="update budget must be a share"):
        UpdateBudget(share)
    with pytest.raises(ValueError, match="update budget must be a share"):
        MaskPruningCallback(schedule=Schedule(update_budget=share))


@pytest.fixture
def slow_importance():
    """An importance criterion that takes 0.2 s a call: an update then costs far more than a step of TinyModule."""

    def slow(entry, index=None):
        time.sleep(0.2)
        return effective_weight_importance(entry, index)

    register_importance("slow_for_test")(slow)
    yield "slow_for_test"
    importance_module._CRITERIA.remove("slow_for_test")


def test_costly_updates_are_spaced_out_and_the_final_sparsity_is_still_reached(tiny_module, slow_importance):
    pruner = MaskPruningCallback(0.8, selector=Selector(importance=slow_importance),
                                 schedule=Schedule(update_budget=0.05, end=0.25))
    make_trainer(max_epochs=10, callbacks=[pruner]).fit(tiny_module)  # 40 steps, a ramp of 10: every 5 steps
    updates = len(pruner.plan.history["positions"])
    assert pruner.plan.every >= 5, pruner.plan.every  # ~0.2 s updates against steps of a few ms
    assert updates < 4  # against 3 on the ramp and the first without the budget
    pruned, total = zeros_and_total(tiny_module)
    assert pruned == round(0.8 * total)


def test_by_default_the_cadence_of_a_short_ramp_comes_from_its_length_whatever_updates_cost(tiny_module,
                                                                                           slow_importance):
    pruner = MaskPruningCallback(0.8, selector=Selector(importance=slow_importance), schedule=Schedule(end=0.25))
    make_trainer(max_epochs=4, callbacks=[pruner]).fit(tiny_module)  # 16 steps, a ramp of 4: every 2 steps
    assert pruner.plan.every == 2 and pruner.plan.history["positions"] == [0, 2, 4]


def test_the_widened_interval_and_measured_costs_resume_from_the_checkpoint(tmp_path, slow_importance):
    def fit(max_epochs, ckpt_path=None):
        pruner = MaskPruningCallback(0.8, selector=Selector(importance=slow_importance), fold_on_fit_end=False,
                                     schedule=Schedule(update_budget=0.05))
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        trainer = make_trainer(max_epochs=max_epochs, callbacks=[pruner, saver], enable_checkpointing=True)
        seen = {}
        original = pruner.on_train_start

        def on_train_start(trainer, pl_module):
            original(trainer, pl_module)
            seen["every"], seen["budget"] = pruner.plan.every, pruner.plan.budget.state_dict()
        pruner.on_train_start = on_train_start
        trainer.fit(TinyModule(), ckpt_path=ckpt_path)
        return pruner, seen

    whole, _ = fit(10)
    state = torch.load(tmp_path / "epoch=4.ckpt", weights_only=False)
    [saved] = [v for k, v in state["callbacks"].items() if k.startswith("MaskPruningCallback")]
    assert saved["update_every"] >= 4 and saved["budget"]["updates"] >= 1
    resumed, seen = fit(10, tmp_path / "epoch=4.ckpt")
    assert seen["every"] == saved["update_every"] and seen["budget"] == saved["budget"]
    assert resumed.plan.target == pytest.approx(0.8)


def test_the_budget_still_ends_the_ramp_on_time_with_a_few_updates_on_it(tiny_module, slow_importance):
    # a new user's trial: on a tiny fast model the budget alone spaced updates past the ramp's end (0, 1, 23)
    pruner = MaskPruningCallback(0.8, selector=Selector(importance=slow_importance),
                                 schedule=Schedule(update_budget=0.05))
    make_trainer(max_epochs=6, callbacks=[pruner]).fit(tiny_module)  # 24 steps, the ramp ends at step 16
    positions = pruner.plan.history["positions"]
    assert positions[-1] == 16 and len(positions) >= 1 + MIN_RAMP_UPDATES, positions
    assert pruner.plan.target == pytest.approx(0.8)
    pruned, total = zeros_and_total(tiny_module)
    assert pruned == round(0.8 * total)
