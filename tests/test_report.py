"""Sweeps (basic, joblib, Optuna launchers) write one folder per job; the report turns them into a table and a plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_masks.report import collect, main as report
from lightning_masks.train import RESULT_FILE
from wandb_reader import read_records

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "masks.plots=false",
         "masks.log_histograms=false"]
ONE_BATCH = ["trainer.fast_dev_run=true"]  # (fast_dev_run turns the loggers off)
FEW_BATCHES = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
               "trainer.limit_test_batches=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep(tmp_path: Path, *overrides: str) -> Path:
    """Run ``lightning-masks-train -m OVERRIDES`` (fast) into ``tmp_path/sweep`` and return that folder."""
    folder = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning_masks.train", "-m", *overrides, *QUIET,
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
    assert all(any(o.startswith("masks.mask_lr=") for o in row["overrides"]) for row in rows)


def test_report_rejects_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report([str(tmp_path / "nope")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report([str(tmp_path)])
    assert "no job folders" in capsys.readouterr().err
