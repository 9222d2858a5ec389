"""Sweeps (basic, joblib, Optuna launchers) write one folder per job; the report turns them into a table and a plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.wandb_reader import read_records

from lightning_masks.app.sweep_report import collect
from lightning_masks.app.sweep_report import main as report
from lightning_masks.app.train import RESULT_FILE

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "masks.logging.plots=false",
         "masks.logging.histograms=false"]
ONE_BATCH = ["debug=fdr"]  # (fast_dev_run turns the loggers off)
FEW_BATCHES = ["debug=limit", "trainer.max_epochs=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep(tmp_path: Path, *overrides: str) -> Path:
    """Run ``lightning-masks-train -m OVERRIDES`` (fast) into ``tmp_path/sweep`` and return that folder."""
    folder = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning_masks.app.train", "-m", *overrides, *QUIET,
                           f"hydra.sweep.dir={folder}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_issue_sweep_runs_and_the_report_lists_every_job(tmp_path):
    folder = sweep(tmp_path, "masks/init=magnitude,stddev,magnitude_noise", "masks.init.noise_scale=0.001,0.01,0.1",
                   "logger=none", *ONE_BATCH)
    assert report([str(folder)]) == 0
    rows = read_csv(folder / "report.csv")
    assert len(rows) == 9 and {row["status"] for row in rows} == {"ok"}
    assert {row["init"] for row in rows} == {"magnitude", "stddev", "magnitude_noise"}
    assert {row["noise_used"] for row in rows if row["init"] != "magnitude_noise"} == {"False"}
    assert sorted(float(r["noise_scale"]) for r in rows if r["init"] == "magnitude_noise") == [0.001, 0.01, 0.1]
    for row in rows:
        assert float(row["sparsity"]) == pytest.approx(0.9, abs=1e-3) and 0 <= float(row["test_acc"]) <= 1
    assert (folder / "report.png").read_bytes().startswith(PNG_MAGIC)
    markdown = (folder / "report.md").read_text()
    assert markdown.count("| ok |") == 9 and "0.1 (unused)" in markdown

    # a job that failed and a job that never ran are reported, not dropped
    failed = json.loads((folder / "2" / RESULT_FILE).read_text())
    (folder / "2" / RESULT_FILE).write_text(json.dumps({**failed, "status": "failed", "error": "RuntimeError: boom"}))
    (folder / "5" / ".hydra" / "overrides.yaml").unlink()
    (folder / "7" / RESULT_FILE).unlink()
    assert report([str(folder)]) == 2
    statuses = {row["job"]: row["status"] for row in read_csv(folder / "report.csv")}
    assert len(statuses) == 8 + 1 and list(statuses.values()).count("ok") == 6  # 8 folders + 1 missing
    assert statuses["2"] == "failed" and statuses["7"] == "no result" and statuses["-"] == "missing"
    markdown = (folder / "report.md").read_text()
    assert "3 of 9 jobs did not finish" in markdown and "RuntimeError: boom" in markdown
    assert "masks.init.noise_scale=0.1" in markdown.split("did not finish")[1]  # the missing job, by its overrides


@pytest.mark.slow
def test_joblib_sweep_writes_each_job_folder_and_names_wandb_runs(tmp_path):
    # 3 jobs on 2 workers: one worker runs two jobs, which must still get a W&B run each
    folder = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "masks/init=magnitude,stddev,magnitude_noise", "logger=[csv,wandb]", "data=synthetic", *FEW_BATCHES)
    for job in ("0", "1", "2"):
        assert json.loads((folder / job / RESULT_FILE).read_text())["status"] == "ok"
        assert (folder / job / ".hydra" / "config.yaml").is_file()
        assert (folder / job / "csv" / "metrics.csv").is_file()
    runs = [next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")
            for path in sorted(folder.glob("*/wandb/offline-run-*/run-*.wandb"))]
    names = {run.display_name for run in runs}
    assert len(runs) == 3 and len(names) == 3 and {run.run_id for run in runs}.__len__() == 3
    assert all(name.startswith("data=synthetic") and name.count("masks/init=") == 1 for name in names)
    assert {run.run_group for run in runs} == {str(folder)}
    assert report([str(folder)]) == 0
    assert [row["status"] for row in collect(folder)] == ["ok", "ok", "ok"]


@pytest.mark.slow
def test_optuna_hparams_search_runs_its_trials(tmp_path):
    folder = sweep(tmp_path, "hparams_search=masks_optuna", "hydra.sweeper.n_trials=2", "data=synthetic",
                   "logger=none", *ONE_BATCH)
    assert "best_value" in (folder / "optimization_results.yaml").read_text()
    assert report([str(folder)]) == 0
    rows = collect(folder)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    assert all(any(o.startswith("masks.optimizer.lr=") for o in row["overrides"]) for row in rows)


def test_report_rejects_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report([str(tmp_path / "nope")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report([str(tmp_path)])
    assert "no job folders" in capsys.readouterr().err


def write_job(folder: Path, job: int, overrides: list[str], accuracy: float, sparsity: float = 0.9) -> None:
    """One job folder as a sweep writes it: ``.hydra/overrides.yaml``, ``.hydra/config.yaml``, ``result.json``."""
    hydra = folder / str(job) / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    init = next(item.split("=")[1] for item in overrides if item.startswith("masks/init="))
    (hydra / "config.yaml").write_text(f"seed: 0\nmasks:\n  init:\n    name: {init}\n    noise_scale: 0.01\n")
    result = {"status": "ok", "metrics": {"test/acc": accuracy}, "init": {}, "sparsity": sparsity, "time_s": 1.0}
    (folder / str(job) / RESULT_FILE).write_text(json.dumps(result))


# accuracies by init, seeds 0, 1, 2: stddev cannot be told from magnitude with 3 seeds, constant is worse
ACCURACIES = {"magnitude": [0.900, 0.910, 0.920], "stddev": [0.905, 0.915, 0.908], "constant": [0.800, 0.810, 0.805]}


def test_report_groups_seeds_into_configurations_and_marks_those_indistinguishable_from_the_best(tmp_path):
    folder = tmp_path / "sweep"
    job = 0
    for init, values in ACCURACIES.items():
        for seed, accuracy in enumerate(values):
            write_job(folder, job, [f"masks/init={init}", f"seed={seed}", "masks.sparsity=0.9"], accuracy)
            job += 1
    write_job(folder, job, ["masks/init=uniform", "seed=0", "masks.sparsity=0.9"], 0.95)  # one seed: untestable
    write_job(folder, job + 1, ["masks/init=magnitude", "seed=0", "masks.sparsity=0.99"], 0.5, sparsity=0.99)
    assert report([str(folder)]) == 0

    configs = {row["config"]: row for row in read_csv(folder / "configs.csv")}
    assert len(configs) == 5 and len(read_csv(folder / "report.csv")) == 11  # jobs stay listed one by one
    magnitude = configs["masks/init=magnitude masks.sparsity=0.9"]
    assert magnitude["seeds"] == "3" and float(magnitude["test_acc"]) == pytest.approx(0.91)
    assert float(magnitude["test_acc_std"]) == pytest.approx(0.01)
    # uniform's single 0.95 is the highest mean, but with one seed nothing can be tested against it
    assert configs["masks/init=uniform masks.sparsity=0.9"]["mark"] == "best"
    assert {configs[f"masks/init={name} masks.sparsity=0.9"]["mark"] for name in ACCURACIES} == {"?"}
    assert configs["masks/init=magnitude masks.sparsity=0.99"]["mark"] == "best"  # alone at its sparsity

    # without the one-seed job, magnitude is the best, stddev within its noise, constant beyond it
    for path in (folder / str(job)).rglob("*"):
        if path.name == "overrides.yaml":
            path.unlink()
    assert report([str(folder)]) == 0
    configs = {row["config"].split()[0]: row for row in read_csv(folder / "configs.csv")
               if row["config"].endswith("0.9")}
    assert [configs[name]["mark"] for name in ("masks/init=magnitude", "masks/init=stddev", "masks/init=constant")] \
        == ["best", "~best", ""]
    assert float(configs["masks/init=stddev"]["p_vs_best"]) > 0.05 > float(configs["masks/init=constant"]["p_vs_best"])
    markdown = (folder / "report.md").read_text()
    assert "| 0.9100 ± 0.0100 |" in markdown and "~best" in markdown and "Welch" in markdown
    image = (folder / "report.png").read_bytes()
    assert image.startswith(PNG_MAGIC)


def test_the_sweep_plot_draws_error_bars_for_configurations(tmp_path):
    import matplotlib.image

    from lightning_masks.app.sweep_plot import plot_sweep

    rows = [{"init": "magnitude", "sparsity": s, "test_acc": 0.9 - s / 10, "seeds": 3, "noise_used": False}
            for s in (0.5, 0.9)]
    bare = matplotlib.image.imread(plot_sweep(rows, tmp_path / "bare.png", title="t"))
    barred = matplotlib.image.imread(plot_sweep([{**row, "test_acc_std": 0.02} for row in rows],
                                                tmp_path / "bars.png", title="t"))
    assert bare.shape == barred.shape and (abs(bare - barred) > 0.2).any()  # the bars (and caption) are drawn


@pytest.mark.slow
def test_a_real_sweep_over_seeds_reports_one_row_per_configuration(tmp_path):
    folder = sweep(tmp_path, "masks/init=magnitude,stddev", "seed=0,1", "logger=none", *ONE_BATCH)
    assert report([str(folder)]) == 0
    configs = read_csv(folder / "configs.csv")
    assert sorted(row["config"].split()[0] for row in configs) == ["masks/init=magnitude", "masks/init=stddev"]
    assert not any("seed=" in row["config"] for row in configs)
    assert [row["seeds"] for row in configs] == ["2", "2"]
    assert {row["mark"] for row in configs} <= {"best", "~best", "", "?"} and "best" in {r["mark"] for r in configs}
