"""Send mask statistics to whatever loggers a Trainer has: scalars to all, richer media where supported.

CSV (and any logger) gets scalars; TensorBoard also gets histograms; W&B also gets histograms, tables,
images and summary values. Call these on rank zero only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py


def log_scalars(loggers: Sequence[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Log scalar metrics to every logger."""
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_histograms(loggers: Sequence[Logger], histograms: Mapping[str, tuple[Tensor, Tensor]], step: int) -> None:
    """Log ``name -> (counts, edges)`` histograms to TensorBoard and W&B (other loggers have no histograms)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, (counts, edges) in histograms.items():
                counts, edges = counts.cpu(), edges.cpu()
                centers = (edges[:-1] + edges[1:]) / 2
                num = counts.sum()
                logger.experiment.add_histogram_raw(
                    name, min=float(edges[0]), max=float(edges[-1]), num=int(num),
                    sum=float((counts * centers).sum()), sum_squares=float((counts * centers * centers).sum()),
                    bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)
        elif isinstance(logger, WandbLogger):
            import wandb

            media = {name: wandb.Histogram(np_histogram=(counts.cpu().numpy(), edges.cpu().numpy()))
                     for name, (counts, edges) in histograms.items()}
            logger.log_metrics(media, step=step)  # type: ignore[arg-type]  # wandb logs media; Lightning types floats


def log_table(loggers: Sequence[Logger], key: str, rows: Sequence[Mapping]) -> None:
    """Log a table (a list of same-keyed rows) to W&B."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rows:
            columns = list(rows[0])
            logger.log_table(key, columns=columns, data=[[row[c] for c in columns] for row in rows])


def log_images(loggers: Sequence[Logger], images: Mapping[str, Path], step: int) -> None:
    """Log PNG files to W&B, one key each."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for key, path in images.items():
                logger.log_image(key, images=[str(path)], step=step)


def log_summary(loggers: Sequence[Logger], values: Mapping[str, float]) -> None:
    """Set W&B run-summary values (what the runs table shows)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(dict(values))
