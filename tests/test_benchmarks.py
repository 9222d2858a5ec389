"""The quality benchmark's bookkeeping: run names under changing defaults, and one tiny run end to end."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


def record(method, **defaults):
    return {"method": method, "defaults": json.dumps({**json.loads(quality.callback_defaults()), **defaults})}


def test_runs_are_named_by_how_they_differ_from_todays_defaults():
    assert quality.label(record("masks")) == "masks"
    assert quality.label(record("masks[init=snip]")) == "masks[init=snip]"
    old = {"rescale_gate": "False", "update_every": "'epoch'"}
    assert quality.label(record("masks", **old)) == "masks[update_every=epoch,rescale_gate=False]"
    # an option that equals today's default disappears: these two runs are the same configuration
    assert quality.label(record("masks[rescale_gate=True,update_every='auto']", **old)) == "masks"
    assert quality.label({"method": "model_pruning"}) == "model_pruning"


def test_gmp_and_plain_are_the_callback_with_their_option_fixed_and_named_against_todays_defaults():
    assert quality.label(record("gmp")) == "gmp"
    assert quality.label(record("plain[init=stddev]")) == "plain[init=stddev]"
    assert quality.label(record("gmp", update_every="'epoch'")) == "gmp[update_every=epoch]"
    plan = quality.Plan(0.9, 1, 7)
    (frozen,) = quality.METHODS["gmp"](None, plan)
    (plain,) = quality.METHODS["plain"](None, plan, init="stddev")
    assert frozen.optimizer.lr == 0.0 and frozen.state.rescale_gate and plain.state.rescale_gate is False
    with pytest.raises(ValueError, match="gmp fixes"):
        quality.METHODS["gmp"](None, plan, mask_lr=0.01)


@pytest.mark.parametrize("model, methods", [
    ("lenet300", ("model_pruning", "wns", "masks", "masks[update_every=epoch]", "gmp", "plain")),
    ("lenet5", ("wns",)),  # WeightNormSparsifier on conv weights, through their 2-D view
])
def test_a_tiny_grid_run_reaches_the_exact_sparsity_for_every_method(model, methods):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 1, 28, 28, generator=generator)
    data = {"train": (inputs, torch.randint(0, 10, (96,), generator=generator)), "test": (inputs[:32],
            torch.randint(0, 10, (32,), generator=generator))}
    common = {"model": model, "epochs": 3, "start": 0, "end": 2, "lr": 1e-3, "batch_size": 32, "seed": 0,
              "sparsity": 0.9}
    for method in methods:
        result = quality.run_one({**common, "method": method}, data)
        assert result["zeros"] == result["target_zeros"] == round(0.9 * result["total"]), method
        assert 0.0 <= result["accuracy"] <= 1.0
    if model == "lenet5":  # every layer, convs included, at the target: the smallest |w| of each went
        assert [round(zeros / total, 3) for zeros, total in result["layers"].values()] == [0.9] * 5


@pytest.mark.parametrize("method, sparsity", [("dense", 0.0), ("model_pruning", 0.9), ("masks", 0.9)])
def test_the_overhead_fits_time_a_step_at_the_sparsity_reached_in_the_first_epoch(method, sparsity):
    import overhead

    seconds, achieved = overhead.fit_step("lenet300", method, batch=8, steps=3, epochs=2)
    assert seconds > 0 and achieved == pytest.approx(sparsity, abs=1e-5)


def test_the_step_anatomy_counts_faults_for_every_method_and_profiles_both_steps(tmp_path):
    import step_anatomy

    step_anatomy.main(["--calls", "3", "--steps", "2", "--profiled-steps", "2", "--top", "3", "--out", str(tmp_path)])
    text = (tmp_path / "step_anatomy.md").read_text()
    faults = text.split("## Minor page faults")[1].split("##")[0]
    for method in step_anatomy.METHODS:
        assert f"| {method} | " in faults
    assert "Heaviest operators a step: dense (fused)" in text and "Heaviest operators a step: masks" in text
    assert "`aten::mm`" in text and "cache flushed" in text


def test_runs_made_before_a_setting_existed_are_named_by_what_they_ran():
    ran = {k: v for k, v in json.loads(quality.callback_defaults()).items() if k not in quality.ADDED_SINCE}
    before = {"method": "masks", "defaults": json.dumps(ran)}  # from before score_dtype, compact and update_budget
    assert quality.label(before) == "masks[score_dtype=None,compact=False]"
    ran["score_dtype"], ran["compact"] = "'bfloat16'", "True"  # from before update_budget alone: none, as today
    assert quality.label({"method": "masks", "defaults": json.dumps(ran)}) == "masks"
    ran["update_budget"] = "0.05"  # the runs whose default was the timing budget
    assert quality.label({"method": "masks", "defaults": json.dumps(ran)}) == "masks[update_budget=0.05]"
    assert quality.label(record("masks")) == "masks"


def test_the_real_size_benchmark_counts_the_mask_state_of_each_method(tmp_path):
    import real_sizes

    real_sizes.main(["--models", "tiny_bert", "--steps", "6", "--rounds", "1", "--out", str(tmp_path),
                     "--name", "tiny"])
    records = {r["method"]: r for r in json.loads((tmp_path / "tiny.json").read_text())}
    assert set(records) == set(real_sizes.METHODS)
    masks, before, dense = records["masks"], records["masks_before"], records["dense"]
    # 8 bytes and the keep bits packed eight a byte a weight; 14 Linear: 3 scalars each
    assert 8 * masks["state_mask"] == 65 * masks["state_masked_weights"] + 8 * 12 * 14
    assert 8 * before["state_mask"] == 161 * before["state_masked_weights"] + 8 * 8 * 14
    assert dense["state_total"] < masks["state_total"] < before["state_total"]
    assert masks["updates"] >= 2 and (tmp_path / "tiny.png").exists()
    assert "| tiny_bert | dense |" in (tmp_path / "tiny.md").read_text()


def test_the_update_cost_benchmark_sets_an_update_against_a_step_on_one_example(tmp_path):
    import update_cost

    update_cost.main(["--models", "lenet300", "--out", str(tmp_path)])
    [record] = json.loads((tmp_path / "update_cost.json").read_text())
    assert record["units"] == 266200 and record["tensors"] == 3
    assert 0 < record["step_one_s"] <= record["step_batch_s"] and record["update_s"] > 0
    assert "| lenet300 | 3 | 0.27M |" in (tmp_path / "update_cost.md").read_text()


# ------------------------------------------------------------------------------------------------ finepruning.py
def finepruning_commands() -> list[list[str]]:
    """The arguments of every finepruning.py command in results/finepruning_commands.sh."""
    import shlex

    text = (Path(quality.__file__).parent / "results" / "finepruning_commands.sh").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("finepruning.py", 1)[1]) for line in text.splitlines()
            if "finepruning.py" in line and not line.lstrip().startswith("#")]


def test_every_listed_fine_pruning_command_builds_its_arms():
    import finepruning

    commands = finepruning_commands()
    assert len(commands) >= 5
    for arguments in commands:
        args = finepruning.parse_args(arguments)
        for method in args.methods:
            module = finepruning.FinePruned(finepruning.build(args.model), 1e-4)
            assert isinstance(finepruning.callbacks_for(method, module, quality.Plan(0.98, 0, 2), 2 / 3), list)


def test_fine_pruning_arm_options_reach_the_initializer_and_the_selector():
    import finepruning

    from lightning_masks import MaskPruningCallback

    module = finepruning.FinePruned(finepruning.build("lenet300"), 1e-4)
    plan = quality.Plan(0.98, 0, 2)
    (noisy,) = finepruning.callbacks_for("masks[init=magnitude_noise,init.noise_scale=0.1,importance=gate]", module,
                                         plan, 2 / 3)
    assert noisy.initializer.noise_scale == 0.1 and noisy.initializer.shift == 0.0
    assert noisy.selector.importance == "gate" and noisy.frozen == "mask"
    (movement,) = finepruning.callbacks_for("movement[regrow=True]", module, plan, 2 / 3)
    assert movement.selector.straight_through and movement.selector.importance == "gate"
    (preset,) = finepruning.callbacks_for("finetuning[init=magnitude_noise,init.noise_scale=0.1]", module, plan, 2 / 3)
    assert preset.initializer.shift == MaskPruningCallback.FINETUNING_SHIFT and preset.frozen == "gate"
    (unshifted,) = finepruning.callbacks_for("finetuning[init.shift=0]", module, plan, 2 / 3)
    assert unshifted.initializer.shift == 0.0
    with pytest.raises(ValueError, match="unknown method"):
        finepruning.callbacks_for("masks_typo", module, plan, 2 / 3)
