"""The ``lightning-masks-train`` command: compose data, model, trainer, loggers and masks with Hydra; fit, test.

Run ``lightning-masks-train`` (or ``python -m lightning_masks.app.train``) for the default, an MLP on digits
pruned to 90%; ``--help`` lists the config groups. Each run writes ``result.json`` into its folder.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ..lightning import MaskPruningCallback, accuracies, flat_field_home
from ..masking import fold, masked_tensors, stats
from .configs import CONFIG_DIR, register

__all__ = ["RESULT_FILE", "main", "run"]

RESULT_FILE = "result.json"

register()


def _format_result(result: dict[str, Any]) -> str:
    """The headline of a result: metrics, final sparsity, time (the callback has printed the per-layer table)."""
    pruned, total = stats.pruned_and_total(result["layers"])
    metrics = "  ".join(f"{key} {value:.4f}" for key, value in sorted(accuracies(result["metrics"]).items()))
    return (f"{metrics}  final sparsity {result['sparsity']:.4f} ({pruned:,} of {total:,} weights pruned)  "
            f"time {result['time_s']:.1f} s")


def _scalars(metrics: dict) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items() if getattr(value, "numel", lambda: 1)() == 1}


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate everything ``cfg`` describes, fit (and test), and return the result written to ``result.json``.

    The callback is built first, so a bad mask option fails before any data is loaded.
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callback = instantiate(cfg.masks)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    others = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[callback, *others], logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    metrics = _scalars(trainer.callback_metrics)
    if cfg.get("test", True):
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(_scalars(trainer.callback_metrics))
    plain = fold(copy.deepcopy(model)) if masked_tensors(model) else model  # masks.fold_on_fit_end=false
    # the exact zeros of the tensors the fit masked (not of every target: channel pruning keeps output layers whole)
    layers = stats.zero_rows(plain, [row["name"] for row in callback.final_layers])
    pruned, total = stats.pruned_and_total(layers)
    return {
        "status": "ok",
        "metrics": metrics,
        "sparsity": pruned / total if total else math.nan,
        "time_s": time.perf_counter() - started,
        "init": {"name": type(callback.initializer).__name__, **vars(callback.initializer)},
        "layers": layers,
        "overrides": _overrides(),
    }


def _finish_wandb(failed: bool) -> None:
    """End the job's W&B run, so that the next job of a sweep in this process starts its own run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


@rank_zero_only
def _write(folder: str, result: dict[str, Any]) -> None:
    path = Path(folder) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))


def refuse_flat_overrides(argv: Sequence[str]) -> None:
    """Exit naming the key to write when an override sets a strategy object's field on ``masks`` itself
    (``masks.mask_lr=0.01`` is ``masks.optimizer.lr=0.01``), where Hydra would only say the key is not in struct.

    Raises:
        SystemExit: for the first such override, with its corrected spelling.
    """
    accepted = inspect.signature(MaskPruningCallback).parameters
    for override in argv:
        match = re.fullmatch(r"\+{0,2}masks\.(\w+)=(.*)", override)
        if not match or match[1] in accepted:
            continue
        home = flat_field_home(match[1], MaskPruningCallback.STRATEGIES)
        if home:
            raise SystemExit(f"{override}: {match[1]} is a field of masks.{home[0]}; write "
                             f"masks.{home[0]}.{home[1]}={match[2]}")


def main() -> Optional[float]:
    """The ``lightning-masks-train`` command: check the overrides, then run Hydra's :func:`run_job`."""
    refuse_flat_overrides(sys.argv[1:])
    return run_job()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def run_job(cfg: DictConfig) -> Optional[float]:
    """Run one job; write ``result.json`` (also when it fails) and return ``cfg.optimized_metric`` to a sweeper."""
    folder = cfg.paths.output_dir
    try:
        result = run(cfg)
    except Exception as error:
        _write(folder, {"status": "failed", "error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc(), "overrides": _overrides()})
        _finish_wandb(failed=True)
        raise
    _write(folder, result)
    _finish_wandb(failed=False)
    rank_zero_only(print)(_format_result(result))
    return result["metrics"].get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
