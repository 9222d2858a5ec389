"""Mask statistics through the real loggers (CSV, TensorBoard, W&B offline), read back from their files."""

import csv
import logging
import os

import lightning.pytorch as pl
import matplotlib.image
import pytest
from helpers import make_trainer, wandb_reader
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_masks import MaskLogging, MaskPruningCallback, Schedule

LAYERS = ("net.0.weight", "net.2.weight")
TOTAL = 8 * 16 + 16 * 3


def fit_with(logger, module, **kwargs):
    pruner = MaskPruningCallback(0.8, schedule=Schedule(end=2), logging=MaskLogging(every_n_steps=2), **kwargs)
    trainer = make_trainer(max_epochs=3, logger=logger, callbacks=[pruner])
    trainer.fit(module)
    return trainer


def test_csv_gets_the_scalars_at_the_cadence(tiny_module, tmp_path):
    trainer = fit_with(CSVLogger(tmp_path), tiny_module)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("masks/global/sparsity")]
    steps = [int(row["step"]) for row in rows]
    assert {2, 4, 6, 8, 10, 12} <= set(steps)  # every 2 steps, plus each epoch end
    last = rows[-1]
    assert float(last["masks/global/sparsity"]) == pytest.approx(round(0.8 * TOTAL) / TOTAL)
    assert float(last["masks/global/target"]) == pytest.approx(0.8)
    for layer in LAYERS:
        for stat in ("sparsity", "kept", "gate_mean", "gate_std", "gate_min", "gate_max", "undecided", "flips"):
            assert last[f"masks/{layer}/{stat}"] != "", (layer, stat)
    assert sum(float(row["masks/global/flips"]) for row in rows if int(row["step"]) % 4 == 0) > 0
    assert "masks/sparsity" in trainer.progress_bar_metrics


def test_the_progress_bar_shows_the_sparsity_of_every_step(tiny_module):
    class Reader(pl.Callback):  # runs after the pruner's hook, as the progress bar's refresh does
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.progress_bar_metrics["masks/sparsity"], pruner.sparsity_now))

    seen = []
    pruner = MaskPruningCallback(0.8, schedule=Schedule(end=2))
    make_trainer(max_epochs=3, callbacks=[pruner, Reader()]).fit(tiny_module)
    shown, actual = zip(*seen)
    assert shown == pytest.approx(actual) and len(set(actual)) > 2 and actual[-1] == pytest.approx(0.8, abs=0.01)


def test_tensorboard_gets_scalars_and_histograms(tiny_module, tmp_path):
    trainer = fit_with(TensorBoardLogger(tmp_path), tiny_module)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "masks/global/sparsity" in tags["scalars"] and "masks/net.0.weight/gate_mean" in tags["scalars"]
    final = events.Scalars("masks/global/sparsity")[-1].value
    assert final == pytest.approx(round(0.8 * TOTAL) / TOTAL)
    for layer in LAYERS:
        gates = events.Histograms(f"masks/{layer}/gates")
        assert len(gates) == 3  # one per epoch
        assert gates[-1].histogram_value.num > 0
        assert events.Histograms(f"masks/{layer}/scores")
    assert sum(events.Histograms("masks/net.0.weight/gates")[-1].histogram_value.bucket) == round(
        events.Scalars("masks/net.0.weight/kept")[-1].value)


@pytest.mark.slow
def test_wandb_offline_run_holds_curves_histograms_table_images_and_summary(tiny_module, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-masks-test", offline=True)
    fit_with(logger, tiny_module)
    wandb.finish()
    [run_file] = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    wandb_reader.wait_until_finished(run_file)
    rows = wandb_reader.history(run_file)
    sparsity = [row["masks/global/sparsity"] for row in rows if "masks/global/sparsity" in row]
    assert len(sparsity) >= 6 and sparsity[-1] == pytest.approx(round(0.8 * TOTAL) / TOTAL)
    assert any("masks/net.2.weight/sparsity" in row for row in rows)
    for layer in LAYERS:
        histograms = [row for row in rows if row.get(f"masks/{layer}/gates/_type") == "histogram"]
        assert len(histograms) == 3 and sum(histograms[-1][f"masks/{layer}/gates/values"]) > 0
    assert any(row.get("masks/layers/_type") == "table-file" and row["masks/layers/nrows"] == 2 for row in rows)
    for image in ("masks/sparsity_over_training", "masks/gate_histograms"):
        [logged] = [row for row in rows if row.get(f"{image}/_type") == "images/separated"]
        [filename] = logged[f"{image}/filenames"]
        assert matplotlib.image.imread(run_file.parent / "files" / filename).shape[0] == logged[f"{image}/height"]
    summary = wandb_reader.summary(run_file)
    assert summary["masks/final_sparsity"] == pytest.approx(round(0.8 * TOTAL) / TOTAL)
    assert summary["masks/pruned"] == round(0.8 * TOTAL)
    assert 0 <= summary["val_acc"] <= 1


def test_console_table_and_pictures(tiny_module, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    trainer = fit_with(CSVLogger(tmp_path), tiny_module)
    assert f"pruned {round(0.8 * TOTAL)}/{TOTAL} ({100 * round(0.8 * TOTAL) / TOTAL:.2f}%)" in caplog.text
    assert "net.0.weight" in caplog.text and "16x8" in caplog.text
    for name in ("sparsity_over_training.png", "gate_histograms.png"):
        image = matplotlib.image.imread(os.path.join(trainer.logger.log_dir, "masks", name))
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
