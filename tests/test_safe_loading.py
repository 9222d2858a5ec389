"""Checkpoints are read without running what they pickle: tensors, plain data and the few safe types Lightning
checkpoints hold load; anything else is refused, and the error names the opt-in flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer
from omegaconf import DictConfig, ListConfig

from lightning_masks import MaskPruningCallback, Schedule, fold_checkpoint
from lightning_masks.export.checkpoints import load_checkpoint
from lightning_masks.export.command import main


class Payload:
    """What a booby-trapped checkpoint carries: unpickling it runs ``exec``, which writes a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A masked checkpoint written by a real fit (masks not folded)."""
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(max_epochs=1, callbacks=[MaskPruningCallback(0.5, fold_on_fit_end=False,
                                                                        schedule=Schedule(end=1))])
    trainer.fit(TinyModule())
    path = tmp_path_factory.mktemp("safe") / "masked.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def booby_trapped(checkpoint, tmp_path) -> tuple[Path, Path]:
    """The checkpoint with a payload in its hyperparameters, and the file the payload would write."""
    target = tmp_path / "pwned.txt"
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["note"] = Payload(target)
    path = tmp_path / "downloaded.ckpt"
    torch.save(content, path)
    return path, target


def test_the_payload_runs_when_trusted(booby_trapped):
    path, target = booby_trapped
    load_checkpoint(path, trust_pickle=True)
    assert target.read_text() == "ran"


def test_load_checkpoint_refuses_to_run_a_payload_and_names_the_flag(booby_trapped, tmp_path):
    path, target = booby_trapped
    with pytest.raises(ValueError, match=r"refers to exec\).*trust_pickle=True"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        fold_checkpoint(path, tmp_path / "plain.ckpt")
    assert not target.exists() and not (tmp_path / "plain.ckpt").exists()


def test_the_command_refuses_to_run_a_payload_and_names_the_flag(booby_trapped, capsys):
    path, target = booby_trapped
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "-o", str(path.with_suffix(".safetensors"))])
    assert exit_.value.code == 2
    assert "--unsafe-pickle" in capsys.readouterr().err
    assert not target.exists() and not path.with_suffix(".safetensors").exists()


def test_lightning_checkpoints_with_namespace_path_and_hydra_hyperparameters_load_safely(checkpoint, tmp_path):
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"].update(args=argparse.Namespace(lr=0.1), root=Path("runs"),
                                       hidden=ListConfig([32, 16]), data=DictConfig({"batch": 8, "name": "digits"}))
    path = tmp_path / "hydra.ckpt"
    torch.save(content, path)
    loaded = load_checkpoint(path)
    assert loaded["hyper_parameters"]["hidden"] == [32, 16] and loaded["hyper_parameters"]["args"].lr == 0.1
    assert loaded["hyper_parameters"]["data"].name == "digits"
    main([str(path), "-o", str(tmp_path / "hydra.safetensors")])
    assert (tmp_path / "hydra.safetensors").is_file()
