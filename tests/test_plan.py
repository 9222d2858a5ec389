"""The lifecycle plan, without a Trainer: cadence, span, skipped updates, early ends, resume state."""

import pytest

from lightning_masks import CallableSchedule, MaskPruningCallback, Schedule, ThresholdSchedule
from lightning_masks.lifecycle import UPDATE_COST_STEPS, Plan
from lightning_masks.lifecycle.plan import UPDATE_SHARE, auto_interval


def run(plan, epochs, steps_per_epoch, steps=None):
    """Drive the plan as the hooks do (over ``steps`` optimizer steps, or the epochs'); return the updates made as
    (position, target)."""
    total = epochs * steps_per_epoch if steps is None else steps
    plan.resolve(total, steps_per_epoch)
    updates = []
    for epoch in range(epochs):
        for batch in range(-1, steps_per_epoch):  # -1: the epoch's start
            step = epoch * steps_per_epoch + max(batch, 0)
            if step >= total:
                return updates
            t = plan.due(epoch, step, epoch_start=batch == -1)
            target = plan.decide(t)
            if target is not None:
                plan.record(t, target, round(target * 100), None, ["w"], [target])
                updates.append((t, target))
    return updates


def test_auto_cadence_spreads_about_a_hundred_updates_over_a_long_ramp():
    plan = Plan(Schedule("linear", final=0.5, start=15, end=65))
    updates = run(plan, epochs=75, steps_per_epoch=100)  # the ramp: steps 1500..6500
    assert plan.cadence == "step" and plan.every == 50 and plan.span == (1500.0, 6500.0)
    assert len(updates) == 1 + 100  # the first (empty) update, then the ramp's; equal targets are skipped
    assert updates[-1] == (6500, 0.5) and plan.shortfall() is None


def test_auto_cadence_of_a_short_fit_keeps_updates_to_its_share_of_the_steps():
    plan = Plan(Schedule("linear", final=0.5, start=15, end=65))
    updates = run(plan, epochs=75, steps_per_epoch=4)  # the ramp: steps 60..260 of 300
    assert plan.every == auto_interval(200, 300) == 14  # 200 / 14 updates of a step each: 5% of 300 steps
    assert [t for t, _ in updates][:3] == [0, 70, 84] and updates[-1] == (266, 0.5)
    assert (len(updates) - 1) * UPDATE_COST_STEPS <= UPDATE_SHARE * 300 and plan.shortfall() is None
    assert len(updates) == 1 + 15  # the first (empty) update, then the ramp's
    for position, target in updates:
        assert position == position // 14 * 14 and target == pytest.approx(0.5 * min(max(position - 60, 0) / 200, 1))
    assert [auto_interval(ramp, total) for ramp, total in [(0, 10), (1, 10), (4, 6), (30, 45), (2000, 3000)]] == \
        [1, 1, 2, 14, 20]  # never wider than half the ramp


def test_the_auto_cadence_depends_on_the_fit_only_and_resumes_alike():
    plans = [Plan(Schedule("cubic", final=0.8)) for _ in range(2)]
    whole = run(plans[0], epochs=30, steps_per_epoch=5)
    resumed = plans[1].fresh()
    resumed.load_state_dict(plans[0].state_dict())
    resumed.resolve(150, 5)
    assert resumed.every == plans[0].every and resumed.span == plans[0].span and whole[-1][1] == 0.8


def test_epoch_cadence_and_callables_update_as_epochs_start():
    plan = Plan(Schedule("linear", final=0.6, end=2, update_every="epoch"))
    assert run(plan, epochs=3, steps_per_epoch=4) == [(0, 0.0), (1, 0.3), (2, 0.6)]
    plan = Plan(CallableSchedule(lambda epoch: [0.0, 0.3, 0.7][epoch]))
    assert plan.cadence == "epoch" and run(plan, 3, 4) == [(0, 0.0), (1, 0.3), (2, 0.7)]
    assert plan.shortfall() is None  # a callable's final value is unknown


def test_the_callbacks_default_ramp_is_cubic_to_0_9_over_the_first_two_thirds():
    plan = MaskPruningCallback(schedule=Schedule(update_every=1)).plan
    updates = run(plan, epochs=6, steps_per_epoch=4)
    end = 16.0  # two thirds of 6 epochs of 4 steps
    assert [position for position, _ in updates] == list(range(17))  # then the final target: nothing to change
    for position, target in updates:
        assert target == pytest.approx(0.9 * (1 - (1 - min(position / end, 1)) ** 3))
    assert plan.shortfall() is None


def test_epoch_cadence_follows_the_default_ramp_as_each_epoch_starts():
    plan = MaskPruningCallback(schedule=Schedule(update_every="epoch")).plan
    updates = run(plan, epochs=6, steps_per_epoch=4)
    end = 4.0  # two thirds of 6 epochs
    assert [epoch for epoch, _ in updates] == [0, 1, 2, 3, 4]
    for epoch, target in updates:
        assert target == pytest.approx(0.9 * (1 - (1 - min(epoch / end, 1)) ** 3))


def test_int_start_and_end_count_epochs_whatever_the_cadence():
    plan = Plan(Schedule("linear", final=0.5, start=1, end=3, update_every=2))
    updates = run(plan, epochs=4, steps_per_epoch=4)
    assert plan.cadence == "step" and updates[-1] == (12, 0.5)
    for position, target in updates:
        assert position == position // 2 * 2
        assert target == pytest.approx(0.5 * min(max(position - 4, 0) / 8, 1))


def test_update_every_n_steps_with_a_fractional_end():
    plan = Plan(Schedule("linear", final=0.5, end=1.0, update_every=3))
    updates = run(plan, epochs=3, steps_per_epoch=4, steps=10)  # max_steps=10: the ramp ends at the last update
    assert [position for position, _ in updates] == [0, 3, 6, 9]
    for position, target in updates:
        assert target == pytest.approx(0.5 * position / 9)


def test_equal_targets_are_skipped_unless_regrowing_or_thresholding():
    for plan, count in [(Plan(Schedule("constant", final=0.6, update_every=1)), 1),
                        (Plan(Schedule("constant", final=0.6, update_every=1), regrow=True), 8),
                        (Plan(ThresholdSchedule("constant", final=0.6, update_every=1)), 8)]:
        assert len(run(plan, epochs=2, steps_per_epoch=4)) == count
        assert plan.position == 7


def test_fresh_forgets_the_last_fit_and_state_dict_restores_it():
    plan = Plan(Schedule("constant", final=0.6, update_every="epoch"))
    run(plan, 3, 4)
    saved = plan.state_dict()
    fresh = plan.fresh()
    assert (fresh.position, fresh.target, fresh.history["positions"]) == (None, 0.0, [])
    assert run(fresh, 3, 4) == [(0, 0.6)]  # the first update of a new fit is never skipped
    resumed = plan.fresh()
    resumed.load_state_dict(saved)
    assert (resumed.position, resumed.target, resumed.pruned, resumed.history) == (2, 0.6, 60, plan.history)


def test_an_early_end_is_a_shortfall_and_final_jumps():
    plan = Plan(Schedule("cubic", final=0.9, end=8))
    run(plan, epochs=3, steps_per_epoch=4)  # resolved for 3 epochs: the ramp is clamped to end at step 11
    assert plan.shortfall() is None
    plan = Plan(Schedule("cubic", final=0.9, end=8, update_every=1, early_end="final"))
    plan.resolve(12 * 4, 4)
    for step in range(10):
        target = plan.decide(plan.due(step // 4, step, epoch_start=False))
        if target is not None:
            plan.record(step, target, 0, None, [], [])
    shortfall = plan.shortfall()
    assert (shortfall.position, shortfall.ramp_end, shortfall.final) == (9, 32.0, 0.9)
    assert 0 < shortfall.reached < 0.9 and plan.end_target() == 0.9
    assert "fit ended at step 9, before the ramp's end at step 32: target sparsity 0.9 (reached 50.00%)" in \
        shortfall.message(0.5, "folded")
    assert Plan(Schedule("cubic", final=0.9)).shortfall().position is None  # ended before any update


def test_a_ramp_inverted_by_the_fit_is_refused():
    plan = Plan(Schedule("linear", final=0.5, start=5, end=0.5))  # epoch 5 is after half of a 6-epoch fit
    with pytest.raises(ValueError, match=r"inverted in this fit: start=5 is step 20, after end=0.5 at step 12"):
        plan.resolve(6 * 4, 4)


# ------------------------------------------------------------------------------------------ arguments
def test_one_string_target_or_exclude_is_one_glob():
    pruner = MaskPruningCallback(targets="layer", exclude="net.0")
    assert pruner.targets == ["layer"] and pruner.exclude == ["net.0"]
