"""Train TinyModule on 2 CPU processes (gloo) and save each rank's masks; run by tests/test_ddp.py.

Usage: python tests/ddp_run.py STRATEGY OUT_DIR [CKPT_PATH]
"""

import atexit
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyModule  # noqa: E402

from lightning_masks import MaskLogging, MaskPruningCallback, Schedule, masked_tensors  # noqa: E402


def note_exit() -> None:
    """At interpreter exit (spawned ranks import this file too): is the process group still alive?"""
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    if out is not None and out.is_dir():
        alive = torch.distributed.is_available() and torch.distributed.is_initialized()
        (out / f"exit-{os.getpid()}.txt").write_text(f"{alive} {os.environ.get('LOCAL_RANK', 'main')}")


atexit.register(note_exit)  # registered first, so it runs after the process group's own exit handlers


class SaveRankState(Callback):
    """Save this rank's masks and schedule position when fit ends (in every process, spawned ones too)."""

    def __init__(self, pruner: MaskPruningCallback, out: str) -> None:
        self.pruner, self.out = pruner, out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masked = masked_tensors(pl_module)
        torch.save({
            "keep": [e.gate.keep.clone() for e in masked],
            "scores": [e.gate.scores.detach().clone() for e in masked],
            "weights": [e.weight.detach().clone() for e in masked],
            "position": self.pruner.plan.position,
            "pruned": self.pruner.plan.pruned,
            "total": sum(e.numel for e in masked),
            "masked_weights": [getattr(*e.owners[0]).detach().clone() for e in masked],
        }, Path(self.out) / f"rank{trainer.global_rank}.pt")


def main(strategy: str, out: str, ckpt_path: str | None) -> None:
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    pruner = MaskPruningCallback(0.8, fold_on_fit_end=False, schedule=Schedule(end=3),
                                 logging=MaskLogging(every_n_steps=1))
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_epochs=4, deterministic=True,
        callbacks=[pruner, ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=-1),
                   SaveRankState(pruner, out)],
        logger=CSVLogger(out, name="logs"), enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    # what the main process holds after fit (under ddp_spawn, what the workers handed back)
    torch.save({"weights": [m.weight.detach().clone() for m in module.modules() if isinstance(m, torch.nn.Linear)],
                "masked": len(masked_tensors(module))}, Path(out) / "main.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
