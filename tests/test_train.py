"""The Hydra app: every config group composes and instantiates, the default and every recipe run, bad input fails
fast."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers.datafiles import write_cifar10, write_fashion_mnist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_masks import (
    GumbelPatterns,
    MaskLogging,
    MaskOptimizer,
    MaskPruningCallback,
    MaskState,
    Schedule,
    Selector,
    get_initializer,
    list_initializers,
)
from lightning_masks.app.configs import CONFIG_DIR, list_recipes
from lightning_masks.app.train import RESULT_FILE, refuse_flat_overrides, run
from lightning_masks.masking.stats import zero_rows

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
NO_PICTURES = ["masks.logging.plots=false", "masks.logging.histograms=false"]  # (the callback's own tests cover them)


def options(group: str) -> list[str]:
    """The YAML choices of a config group shipped in conf/."""
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(overrides=(), output_dir: Path | None = None, mode: RunMode | None = None):
    """Compose the app's config as the command would, with the Hydra runtime set (for ${hydra:...})."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = mode or cfg.hydra.mode or RunMode.RUN
        cfg.hydra.runtime.output_dir = str(output_dir or Path.cwd())
        cfg.hydra.job.override_dirname = ",".join(sorted(overrides))
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as Hydra hands the config to the app
    return cfg


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m lightning_masks.app.train ARGS`` in ``cwd``, offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_masks.app.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------- every group composes
@pytest.mark.parametrize("group, option", [(g, o) for g in ("data", "model", "trainer", "logger", "callbacks")
                                           for o in options(g) if o != "default"])
def test_every_config_group_option_instantiates(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = {"data": ["data.root=/anywhere"] if option == "cifar10" else [],
             "trainer": ["trainer.accelerator=cpu"]}.get(group, [])  # no GPU needed to build a gpu/ddp Trainer
    if option.startswith("transfer"):  # pretrains its source on a small file set, cached in tmp_path
        extra = ["data=fashion_mnist", f"data.root={write_fashion_mnist(tmp_path / 'fashion')}",
                 f"model.source.path={tmp_path / 'pretrained.pt'}"]
    cfg = compose_config([f"{group}={option}", *extra], tmp_path)
    node = cfg[group]
    keyed = group in ("logger", "callbacks")  # each option is one named entry; several can be chosen at once
    built = [instantiate(value) for value in node.values()] if keyed else [instantiate(node)]
    expected = {"data": "DataModule", "model": "", "trainer": "Trainer", "logger": "Logger", "callbacks": ""}[group]
    assert all(type(obj).__name__.endswith(expected) for obj in built)
    assert (not keyed) or len(built) == (option != "none")
    if group == "callbacks":
        assert all(isinstance(obj, pl.Callback) for obj in built)


def test_callbacks_from_the_command_line_join_the_masks_in_the_trainer(tmp_path):
    result = command("callbacks=[early_stopping,model_checkpoint]", "trainer.max_epochs=2", *QUIET, *NO_PICTURES,
                     f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert json.loads((tmp_path / RESULT_FILE).read_text())["status"] == "ok"


@pytest.mark.parametrize("name", list_initializers())
def test_every_registered_initializer_has_a_config(name):
    assert name in options("masks/init"), f"conf/masks/init/{name}.yaml is missing"
    initializer = instantiate(compose_config([f"masks/init={name}"]).masks.init)
    assert type(initializer) is type(get_initializer(name))


@pytest.mark.parametrize("schedule", options("masks/schedule"))
def test_every_schedule_config_builds_the_callback(schedule):
    callback = instantiate(compose_config([f"masks/schedule={schedule}", "masks.sparsity=0.8"]).masks)
    assert isinstance(callback, MaskPruningCallback) and isinstance(callback.schedule, Schedule)
    assert callback.schedule.shape == ("cubic" if schedule == "threshold" else schedule)
    assert callback.schedule.final == (0.5 if schedule == "threshold" else 0.8)


def test_noise_scale_reaches_only_initializers_that_take_it():
    noisy = instantiate(compose_config(["masks/init=magnitude_noise", "masks.init.noise_scale=0.1"]).masks.init)
    assert noisy.noise_scale == 0.1
    plain = instantiate(compose_config(["masks/init=magnitude", "masks.init.noise_scale=0.1"]).masks.init)
    assert not hasattr(plain, "noise_scale")


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm"])
def test_launcher_choices_compose(launcher):
    compose_config([f"hydra/launcher={launcher}"])
    assert launcher.split("_")[0] in HydraConfig.get().launcher._target_.lower()


def test_hparams_search_is_an_optuna_sweep_over_init_noise_and_mask_lr():
    cfg = compose_config(["hparams_search=masks_optuna"])
    sweeper = HydraConfig.get().sweeper
    assert "optuna" in sweeper._target_.lower() and HydraConfig.get().mode == RunMode.MULTIRUN
    assert set(sweeper.params) == {"masks/init", "masks.init.noise_scale", "masks.optimizer.lr"}
    assert cfg.optimized_metric == "val/acc"


def test_wandb_runs_are_named_by_overrides_and_grouped_by_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = ["logger=wandb", "masks/init=stddev"]
    cfg = compose_config(overrides, tmp_path, mode=RunMode.MULTIRUN)
    assert cfg.logger.wandb.name == "logger=wandb,masks/init=stddev"
    assert cfg.logger.wandb.group == HydraConfig.get().sweep.dir
    assert compose_config(overrides, tmp_path).logger.wandb.group is None  # a single run has no group


# ------------------------------------------------------------------------------------- runs
def run_config(overrides, tmp_path):
    cfg = compose_config(["logger=csv", "debug=fdr", *QUIET, *NO_PICTURES, *overrides], tmp_path)
    return run(cfg)


def check_result(result, sparsity):
    assert result["status"] == "ok"
    assert {"test/acc", "val/acc"} <= set(result["metrics"])
    assert result["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert result["layers"] and all(0 <= row["kept"] <= row["total"] for row in result["layers"])


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_runs(recipe, tmp_path):
    data_root = {"fashion": lambda: write_fashion_mnist(tmp_path / "fashion"),
                 "cifar10": lambda: write_cifar10(tmp_path / "cifar", per_batch=8)}
    prefix = recipe.split("_")[0]
    extra = [f"data.root={data_root[prefix]()}", "data.num_workers=0"] if prefix in data_root else []
    extra += ["trainer=cpu"] if prefix == "cifar10" else []
    extra += [f"model.source.path={tmp_path / 'pretrained.pt'}"] if "transfer" in recipe else []
    cfg = compose_config([f"recipe={recipe}", "debug=fdr", *QUIET, *NO_PICTURES, *extra], tmp_path)
    result = run(cfg)
    check_result(result, cfg.masks.sparsity)
    names = {row["name"] for row in result["layers"]}
    if recipe.endswith("transformer"):
        assert any(name.endswith("in_proj_weight") for name in names)
    if "lenet5" in recipe or "resnet" in recipe:
        assert any(row["shape"].count("x") == 3 for row in result["layers"])  # conv weights are masked



@pytest.mark.parametrize("frozen", ["mask", "gate"])
def test_a_frozen_backbone_is_counted_in_the_result(frozen, tmp_path):
    """The result counts the zeros of every tensor the fit masked, frozen ones too (not 0 of 0, sparsity nan)."""
    extra = [f"data.root={write_fashion_mnist(tmp_path / 'fashion')}", "data.num_workers=0",
             f"model.source.path={tmp_path / 'pretrained.pt'}"]
    cfg = compose_config(["recipe=fashion_transfer_lenet300", "model.backbone_lr=0", f"masks.frozen={frozen}",
                          "debug=fdr", *QUIET, *NO_PICTURES, *extra], tmp_path)
    result = run(cfg)
    check_result(result, cfg.masks.sparsity)
    assert {row["name"] for row in result["layers"]} == {"net.backbone.1.weight", "net.backbone.3.weight"}

def test_unfolded_model_is_measured_through_its_masks(tmp_path):
    result = run_config(["masks.fold_on_fit_end=false", "masks.sparsity=0.75"], tmp_path)
    check_result(result, 0.75)


def test_the_rows_of_a_plain_model_count_exact_zeros():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].weight.data[0] = 0.0
    rows = zero_rows(model)
    assert [(row["name"], row["kept"], row["total"]) for row in rows] == [("0.weight", 8, 12), ("2.weight", 6, 6)]
    assert rows[0]["sparsity"] == pytest.approx(1 / 3)



def test_the_rows_of_named_tensors_count_frozen_ones():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    model[0].weight.data[1] = 0.0
    rows = zero_rows(model, ["0.weight", "2.weight"])
    assert [(row["name"], row["kept"], row["total"]) for row in rows] == [("0.weight", 8, 12), ("2.weight", 6, 6)]

@pytest.mark.slow
def test_default_command_trains_and_prints_accuracy_and_sparsity(tmp_path):
    done = command("trainer.enable_progress_bar=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    headline = next(line for line in done.stdout.splitlines() if "final sparsity" in line)
    assert "test/acc" in headline
    printed = done.stdout + done.stderr
    assert printed.count("net.1.weight") == 1 and "kept / total" in printed  # the callback's table, once
    (result_file,) = tmp_path.glob(f"outputs/*/*/{RESULT_FILE}")
    result = json.loads(result_file.read_text())
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert result["metrics"]["test/acc"] > 0.8
    assert f"{result['metrics']['test/acc']:.4f}" in headline
    assert (result_file.parent / ".hydra" / "config.yaml").is_file()
    assert (result_file.parent / "csv" / "metrics.csv").is_file()


# ------------------------------------------------------------------------------------- bad input
def test_unknown_init_name_lists_the_known_ones(tmp_path):
    with pytest.raises(Exception, match=r"unknown initializer 'nope'; known initializers: \[.*magnitude"):
        run_config(["masks.init.name=nope"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="(?s)masks/init.*magnitude_noise"):
        compose_config(["masks/init=nope"])


def test_missing_data_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*data.root"):
        run_config(["data=fashion_mnist", f"data.root={tmp_path}", "model=lenet300"], tmp_path)


def test_bad_sparsity_fails_before_training_with_a_clear_message(tmp_path):
    done = command("masks.sparsity=1.5", "logger=none", cwd=tmp_path)
    assert done.returncode != 0
    assert "sparsity must be in [0, 1), got 1.5" in done.stderr
    assert "Epoch" not in done.stdout + done.stderr
    (result_file,) = tmp_path.glob(f"outputs/*/*/{RESULT_FILE}")
    result = json.loads(result_file.read_text())
    assert result["status"] == "failed" and "1.5" in result["error"]


@pytest.mark.parametrize("override, fix", [
    ("masks.mask_lr=0.05", "masks.optimizer.lr=0.05"),
    ("masks.end=0.5", "masks.schedule.end=0.5"),
    ("masks.rescale_gate=false", "masks.state.rescale_gate=false"),
    ("masks.log_histograms=false", "masks.logging.histograms=false"),
    ("masks.granularity=2:4", "masks.selector.granularity=2:4"),
    ("+masks.update_every=5", "masks.schedule.update_every=5"),
])
def test_a_strategy_field_set_on_masks_itself_names_its_key(override, fix):
    with pytest.raises(SystemExit, match=f"write {fix}$"):
        refuse_flat_overrides(["masks.sparsity=0.5", "masks.optimizer.lr=0.1", "seed=1", override])


def test_the_command_refuses_a_flat_strategy_field_before_hydra(tmp_path):
    done = command("masks.mask_lr=0.05", "logger=none", cwd=tmp_path)
    assert done.returncode != 0
    assert "mask_lr is a field of masks.optimizer; write masks.optimizer.lr=0.05" in done.stderr
    assert not list(tmp_path.glob("outputs/*"))  # refused before Hydra made a run folder


# ------------------------------------------------------------------------------------- configs match the code
def _defaults(factory) -> dict:
    """Keyword defaults of a callable; for a class, of every ``__init__`` along its bases (subclass first)."""
    found = {}
    for function in ([c.__init__ for c in factory.__mro__ if "__init__" in vars(c)] if isinstance(factory, type)
                     else [factory]):
        for name, p in inspect.signature(function).parameters.items():
            if p.default is not inspect.Parameter.empty:
                found.setdefault(name, p.default)
    return found


@pytest.mark.parametrize("option", options("masks/schedule"))
def test_every_schedule_yaml_default_equals_the_signatures(option):
    node = compose_config([f"masks/schedule={option}"]).masks.schedule
    cls = instantiate(node).__class__
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    deliberate = {"shape"} | ({"final"} if option == "threshold" else set())  # what the file is about
    assert {key: node[key] for key in defaults if key not in deliberate} == \
           {key: value for key, value in defaults.items() if key not in deliberate}
    assert set(node) - {"_target_"} == set(defaults)


@pytest.mark.parametrize("option", options("masks/init"))
def test_every_init_yaml_default_equals_the_signatures(option):
    node = compose_config([f"masks/init={option}"]).masks.init
    defaults = _defaults(type(get_initializer(node.name)))
    fields = {key: node[key] for key in node if key not in ("_target_", "name")}
    if "noise_scale" not in defaults:
        assert fields.pop("noise_scale") is None  # carried for sweeps only
    assert fields == {key: defaults[key] for key in fields}
    assert set(defaults) - {"seed", "generator"} <= set(fields)


def test_the_trainer_yaml_sets_what_differs_from_lightnings_defaults_and_shows_three_switches():
    node = compose_config().trainer
    defaults = _defaults(pl.Trainer)
    switches = {"enable_checkpointing", "enable_progress_bar", "enable_model_summary"}  # on (None) in Lightning
    assert all(node[key] is True and defaults[key] is None for key in switches)
    differing = {key for key in node if key != "_target_" and key not in switches and node[key] != defaults[key]}
    assert set(node) - {"_target_"} - switches == differing == {"default_root_dir", "max_epochs", "min_epochs",
                                                                "accelerator", "devices", "log_every_n_steps"}


@pytest.mark.parametrize("option", options("debug"))
def test_every_debug_option_shortens_the_trainer_it_builds(option, tmp_path):
    trainer = instantiate(compose_config([f"debug={option}"], tmp_path).trainer)
    assert trainer.fast_dev_run if option == "fdr" else (trainer.max_epochs, trainer.limit_train_batches) == (2, 4)


def test_the_callback_yaml_carries_every_argument_at_its_default():
    node = compose_config().masks
    defaults = _defaults(MaskPruningCallback)
    deliberate = {"sparsity": 0.9, "seed": 0}  # the command's defaults: 90% (the callback's None), the app's seed
    composed = {"init", "schedule", "selector", "state", "optimizer", "logging"}  # config groups of their own
    assert set(node) - {"_target_"} == set(defaults)
    for key, default in defaults.items():
        if key in composed:
            continue
        expected = deliberate.get(key, default)
        assert node[key] == (list(expected) if isinstance(expected, tuple) else expected), key


@pytest.mark.parametrize("group, strategy", [("schedule", Schedule), ("state", MaskState),
                                             ("optimizer", MaskOptimizer), ("logging", MaskLogging)])
def test_each_strategy_yaml_carries_every_field_at_its_default(group, strategy):
    node = compose_config().masks[group]
    assert set(node) - {"_target_"} == {field.name for field in dataclasses.fields(strategy)}
    assert instantiate(node) == strategy()


@pytest.mark.parametrize("option", options("masks/selector"))
def test_every_selector_config_builds_the_callback_with_its_selector(option):
    n_m = option.startswith("two_four")
    overrides = [f"masks/selector={option}"] + (["masks.sparsity=null"] if n_m else []) + (
        ["masks/schedule=constant"] if option == "two_four_gumbel" else [])
    node = compose_config(overrides).masks
    callback = instantiate(node)
    assert isinstance(callback.selector, Selector)
    defaults = {name: p.default for name, p in inspect.signature(Selector).parameters.items()}
    if option == "global":  # the base the others change: every field at the Selector's default
        assert {key: node.selector[key] for key in defaults} == {**defaults, "tie": []}
    assert callback.sparsity == (0.5 if n_m else 0.9)
    assert (callback.selector.relaxation == GumbelPatterns()) == (option == "two_four_gumbel")


def test_the_result_counts_the_tensors_the_fit_masked_as_the_callbacks_table_does(tmp_path):
    """Channel pruning keeps the output layer whole: the headline's sparsity is over the masked tensors, as the
    table printed above it, not diluted by the dense output layer."""
    result = run_config(["masks/selector=channel", "debug=limit"], tmp_path)
    assert result["sparsity"] == pytest.approx(0.9, abs=0.005)  # whole channels: 0.9023 (0.8684 with the head)
    assert result["layers"] and all(row["sparsity"] > 0.5 for row in result["layers"]), result["layers"]
