"""What a fit says about its masks: the setup line and its warnings, the scalars and histograms while training, the
per-layer table, summary and pictures at its end (to the console and whatever loggers the Trainer has)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .._checks import check_flags, is_int
from ..masking import MaskedTensor, Targets, stats
from . import loggers

__all__ = ["MaskLogging", "accuracies"]


@dataclass(frozen=True)
class MaskLogging:
    """What a fit logs about its masks, through whatever loggers the Trainer has.

    Args:
        every_n_steps: cadence of the ``masks/...`` scalars during training (``None``: the Trainer's
            ``log_every_n_steps``; 0: only as each epoch ends). Statistics are computed (and synced to the host)
            only then.
        histograms: log gate and score histograms (TensorBoard, W&B) as each epoch ends.
        plots: at the end of fit, write each layer's sparsity over training and gate histograms (PNG) into the
            run folder and log them to W&B.

    Raises:
        ValueError: ``every_n_steps`` not an int >= 0 or ``None``, a flag not a bool.
    """

    every_n_steps: Optional[int] = None
    histograms: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and not (is_int(self.every_n_steps) and self.every_n_steps >= 0):
            raise ValueError(f"every_n_steps must be an int >= 0 or None, got {self.every_n_steps!r}; 0 logs "
                             "only as each epoch ends")
        check_flags(histograms=self.histograms, plots=self.plots)


def announce(masked: Sequence[MaskedTensor], resolved: Targets, outputs: Sequence[str], what: str) -> None:
    """The setup line (what is masked, ``what`` it aims at, what is left dense by rule) and a warning for each
    layer left dense for no stated reason."""
    total = sum(entry.numel for entry in masked)
    rank_zero_info(f"lightning_masks: masking {len(masked)} tensors ({total:,} weights), {what}"
                   f"{_frozen_masked(masked, resolved)}{_left_dense(resolved, outputs)}")
    if resolved.unmasked:
        rank_zero_warn(f"lightning_masks: {len(resolved.unmasked)} trainable weight matrices are left dense "
                       f"(no registered layer kind): {stats.short_names(resolved.unmasked)}. Name them in "
                       "`targets`, or register their layer with lightning_masks.register_layer_kind")
    if resolved.foreign:
        rank_zero_warn(f"lightning_masks: {len(resolved.foreign)} layers are left dense because something else "
                       f"already computes their weight: {stats.short_names(resolved.foreign)}. To mask them, remove "
                       "that first (torch.nn.utils.parametrize.remove_parametrizations, prune.remove)")


def _frozen_masked(masked: Sequence[MaskedTensor], resolved: Targets) -> str:
    """The setup line's words on the frozen tensors it masks (``frozen="mask"`` or ``"gate"``)."""
    frozen = set(resolved.frozen_chosen)
    binary = [entry.name for entry in masked if entry.name in frozen and entry.gate.is_binary]
    gated = [entry.name for entry in masked if entry.name in frozen and not entry.gate.is_binary]
    parts = []
    if binary:
        parts.append(f"frozen tensors under binary masks, their kept weights kept bit for bit (frozen='mask'): "
                     f"{stats.short_names(binary)}")
    if gated:
        parts.append(f"frozen tensors under soft gates, their kept weights scaled by the learned gate when folded "
                     f"(frozen='gate'): {stats.short_names(gated)}")
    return "".join(f"; {part}" for part in parts)


def _left_dense(resolved: Targets, outputs: Sequence[str]) -> str:
    """The setup line's tail: what is left dense by rule, and how to include it."""
    parts = []
    if resolved.embeddings:
        example = resolved.embeddings[0].split(" = ")[0]
        parts.append(f"embedding tables and tensors tied to them left dense: {stats.short_names(resolved.embeddings)} "
                     f"(to mask them, name them in targets, e.g. targets=[..., {example!r}])")
    if resolved.routers:
        example = resolved.routers[0].split(" = ")[0]
        parts.append(f"mixture-of-experts routers and gates left dense: {stats.short_names(resolved.routers)} (to "
                     f"mask them, name them in targets, e.g. targets=[..., {example!r}])")
    if resolved.adapters:
        parts.append(f"PEFT adapter factors left dense (the frozen base weights under them are masked): "
                     f"{stats.short_names(resolved.adapters)}")
    if outputs:
        parts.append(f"output layers kept whole by channel pruning: {stats.short_names(outputs)} "
                     "(output_layers=None prunes them)")
    if resolved.frozen:
        parts.append(f"frozen tensors (requires_grad=False at setup) left dense: {stats.short_names(resolved.frozen)}; "
                     "to learn masks over them with the weights kept, pass frozen='mask' (targeted ones)")
    return "".join(f"; {part}" for part in parts)


def log_scalars(trainer: pl.Trainer, masked: Sequence[MaskedTensor], flips: Mapping[str, torch.Tensor],
                target: float, threshold: float | None, *, statistics: Callable = stats.mask_stats) -> None:
    """The ``masks/...`` scalars (``statistics``: :func:`~lightning_masks.masking.stats.mask_stats`, or its version over
    every process's shards; the last update's target and cut) to every logger, with one host sync."""
    values = statistics(masked, flips)
    if not trainer.is_global_zero:  # a rank that only took part in counting its shards
        return
    numbers = torch.stack([v.float().cpu() for v in values.values()]).tolist()  # the one host sync
    metrics = {f"masks/{key}": number for key, number in zip(values, numbers)}
    metrics["masks/global/target"] = target
    if threshold is not None:
        metrics["masks/global/threshold"] = threshold
    loggers.log_scalars(trainer.loggers, metrics, trainer.global_step)


def gate_histograms(masked: Sequence[MaskedTensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per masked tensor, the histogram ``(counts, edges)`` of its live (kept) gates, in [0, 1]."""
    return {entry.name: stats.histogram(stats.live_gates(entry)) for entry in masked}


def histograms(masked: Sequence[MaskedTensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The logged histograms: ``masks/<tensor>/gates`` and ``masks/<tensor>/scores`` of the live entries."""
    result = {f"masks/{name}/gates": value for name, value in gate_histograms(masked).items()}
    for entry in masked:
        scores = entry.gate.scores.detach()[entry.gate.keep].float()  # the live ones
        if scores.numel():
            result[f"masks/{entry.name}/scores"] = stats.histogram(scores, low=scores.min().item(),
                                                                  high=scores.max().item())
    return result


def report_fit(trainer: pl.Trainer, rows: Sequence[Mapping], masked: Sequence[MaskedTensor], history: Mapping,
               unit: str, pictures: bool, *, gates: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> None:
    """The end-of-fit console table of ``rows`` (:func:`~lightning_masks.masking.stats.layer_rows`, printed by
    :func:`~lightning_masks.masking.stats.format_layer_table`), the loggers' table and summary and, with ``pictures``,
    each layer's sparsity over training (``history``, positions in ``unit``) and the gate histograms of ``masked`` as
    PNGs in the run folder, logged to W&B. ``gates``: those histograms when the caller has them (over every process's
    shards), else they are taken from ``masked``."""
    rank_zero_info(stats.format_layer_table(rows))
    if not trainer.loggers:
        return
    folder = Path(trainer.log_dir or trainer.default_root_dir) / "masks"  # a collective call: all ranks
    if not trainer.is_global_zero:
        return
    loggers.log_table(trainer.loggers, "masks/layers", rows)
    pruned, total = stats.pruned_and_total(rows)
    summary = {"masks/final_sparsity": pruned / total, "masks/pruned": pruned, "masks/total": total}
    summary.update({k: float(v) for k, v in accuracies(trainer.callback_metrics).items()})
    loggers.log_summary(trainer.loggers, summary)
    if pictures:
        if gates is None:
            gates = gate_histograms(masked)
        loggers.log_images(trainer.loggers, _draw(gates, history, unit, folder), trainer.global_step)


def _draw(gates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], history: Mapping, unit: str,
          folder: Path) -> dict[str, Path]:
    """The pictures as PNG files in ``folder``; none, with a warning naming the extra, without matplotlib."""
    try:
        from . import plots
    except ImportError as error:
        rank_zero_warn(f"lightning_masks: no pictures drawn ({error}); or pass logging=MaskLogging(plots=False)")
        return {}
    arrays = {name: (counts.cpu().numpy(), edges.cpu().numpy()) for name, (counts, edges) in gates.items()}
    return {
        "masks/sparsity_over_training": plots.sparsity_over_training(
            history["layers"], history["sparsity"], history["positions"], folder / "sparsity_over_training.png",
            unit=unit),
        "masks/gate_histograms": plots.gate_histograms(arrays, folder / "gate_histograms.png"),
    }


def accuracies(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The accuracy metrics among ``metrics`` (names holding ``"acc"``, as ``val/acc``), what the summary reports."""
    return {key: value for key, value in metrics.items() if "acc" in key}
