"""MaskPruningCallback: the Lightning glue around masks, initializers, schedules and selection."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.utils import parametrize
from typing_extensions import override

from . import loggers, plots, stats
from .coupling import coupled_channels
from .init import InitSpec, get_initializer
from .masks import MaskedTensor, TargetSpec, attach, detach, fold, gates_disabled, masked_tensors, restore_masks_on_load
from .optim import place_scores
from .schedule import Schedule, ScheduleSpec, ThresholdSchedule, get_schedule, resolve_span
from .select import Selector, parse_granularity

__all__ = ["MaskPruningCallback"]

DEFAULT_SPARSITY = 0.9
AUTO_UPDATES = 100  # mask updates spread over the ramp by update_every="auto"


class MaskPruningCallback(Callback):
    """Prune any LightningModule with learnable, weight-dependent masks ``w * sigmoid(scores / T) * keep``.

    At ``setup`` the selected weights get masks whose scores ``init`` derives from the weights (before the
    optimizers exist, so an unmodified ``configure_optimizers`` trains them); the keep-masks follow
    ``schedule`` up to ``sparsity``; at the end of fit the masks are folded into plain weights with
    exact zeros.

    Args:
        sparsity: final fraction of pruned entries, in [0, 1). Default 0.9 (or ``1 - N/M`` for N:M).
        init: initializer name (see :func:`~lightning_masks.init.list_initializers`), an
            :class:`~lightning_masks.init.Initializer`, or a callable ``weight -> scores``.
        schedule: a shape name (``cubic``, ``linear``, ...), a :class:`~lightning_masks.schedule.Schedule`
            (a :class:`~lightning_masks.schedule.ThresholdSchedule` prunes by gate threshold), or a callable
            ``t -> sparsity`` with ``t`` the epoch index or global step.
        start, end: the ramp of a named schedule: ``int`` epochs or ``float`` fractions of training (for
            steps, pass a :class:`~lightning_masks.schedule.Schedule` with ``unit="step"``). Default: over the
            first two thirds.
        update_every: when the keep-masks are updated: ``"auto"`` (every N optimizer steps, N chosen so that
            about 100 updates follow the ramp: a finer ramp prunes better, benchmarks/results/study_cadence.md),
            ``"epoch"`` (as each epoch starts) or an int ``N`` (every N steps). Updates whose target equals the
            last one are skipped (nothing would change). A callable ``schedule`` is called per epoch under
            ``"auto"``.
        targets, exclude: what to mask (globs on qualified names, or module types); default every
            Linear, Conv1d/2d/3d and MultiheadAttention projection weight.
        init_kwargs: options for a named ``init`` (e.g. ``{"noise_scale": 0.1}``).
        temperature: the gate's ``T > 0``.
        rescale_gate: divide each gate by its initial value so training starts from the dense function
            (on by default: benchmarks/results/study_lenet300_s99.md).
        mode, importance, layer_floor, regrow, granularity: see :class:`~lightning_masks.select.Selector`.
        straight_through: pruned entries' scores keep learning, their gradient taken as if they were kept
            (straight-through, movement pruning: :func:`~lightning_masks.masks.straight_through_gated`), so that
            with ``regrow=True`` a pruned weight whose gate the loss raises can come back. Needs ``regrow=True``.
            Off by default (benchmarks/README.md, issue 16: what it gained at 99 / 99.5%).
        tie: groups of globs on masked tensor names pruned together unit by unit (see
            :class:`~lightning_masks.select.Selector`), e.g. the BatchNorms that add into one residual stream,
            so that export can remove the stream's pruned channels. ``"auto"``: the masked BatchNorms whose
            channels meet in a sum (:func:`~lightning_masks.coupling.coupled_channels` on the module's
            ``example_input_array``).
        mask_lr, mask_weight_decay: learning rate and weight decay of the scores, in their own param group of
            the optimizer that trains the weight (default ``mask_lr=0.01``, the weight decay of the weight's
            group). Both ``None`` leaves the scores where ``configure_optimizers`` put them.
        fold_on_fit_end: leave a plain model (no parametrizations, exact zeros) when fit ends.
        seed: seed for random initializers; ``None`` uses torch's global generator.
        log_every_n_steps: cadence of the ``masks/...`` scalars during training (``None``: the Trainer's;
            0: only as each epoch ends). Statistics are computed (and synced to the host) only then.
        log_histograms: log gate and score histograms (TensorBoard, W&B) as each epoch ends.
        plots: at the end of fit, write each layer's sparsity over training and gate histograms (PNG) into the
            run folder and log them to W&B.

    Raises:
        ValueError: any argument out of range, at construction; an unsupported strategy, a target that
            matches nothing, NaN/Inf weights or an unbounded training length, in ``setup``.

    Example:
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[MaskPruningCallback(sparsity=0.9)])  # doctest: +SKIP
    """

    def __init__(
        self,
        sparsity: Optional[float] = None,
        init: InitSpec = "magnitude",
        schedule: ScheduleSpec = "cubic",
        *,
        start: Union[int, float] = 0,
        end: Union[int, float] = 2 / 3,
        update_every: Union[str, int] = "auto",
        targets: Optional[Iterable[TargetSpec]] = None,
        exclude: Iterable[TargetSpec] = (),
        init_kwargs: Optional[Mapping[str, Any]] = None,
        temperature: float = 1.0,
        rescale_gate: bool = True,
        mode: str = "global",
        importance: str = "effective_weight",
        layer_floor: float = 0.25,
        regrow: bool = False,
        straight_through: bool = False,
        granularity: str = "element",
        tie: Union[str, Iterable[Iterable[str]]] = (),
        mask_lr: Optional[float] = 1e-2,
        mask_weight_decay: Optional[float] = None,
        fold_on_fit_end: bool = True,
        seed: Optional[int] = None,
        log_every_n_steps: Optional[int] = None,
        log_histograms: bool = True,
        plots: bool = True,
    ) -> None:
        nm_sparsity = parse_granularity(granularity).sparsity
        if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}; e.g. sparsity=0.9 prunes 90%")
        if nm_sparsity is not None and sparsity is not None and not math.isclose(sparsity, nm_sparsity):
            raise ValueError(f"granularity {granularity!r} fixes sparsity at {nm_sparsity}, got sparsity={sparsity}; "
                             "leave sparsity unset")
        final = sparsity if sparsity is not None else (nm_sparsity if nm_sparsity is not None else DEFAULT_SPARSITY)
        if update_every not in ("auto", "epoch") and not (isinstance(update_every, int) and update_every > 0):
            raise ValueError(f"update_every must be 'auto', 'epoch' or a positive int (steps), got {update_every!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}; try 1.0 (lower is a harder gate)")
        if log_every_n_steps is not None and not (isinstance(log_every_n_steps, int) and log_every_n_steps >= 0):
            raise ValueError(f"log_every_n_steps must be an int >= 0 or None, got {log_every_n_steps!r}")
        for name, value in (("mask_lr", mask_lr), ("mask_weight_decay", mask_weight_decay)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value!r}")

        self.sparsity = final
        self.initializer = get_initializer(init, **dict(init_kwargs or {}))
        ramp = {"start": start, "end": end, "unit": "epoch"} if isinstance(schedule, str) else {}
        self.schedule = get_schedule(schedule, final, **ramp)
        if update_every == "auto" and not isinstance(self.schedule, Schedule):
            update_every = "epoch"
        self.cadence = "epoch" if update_every == "epoch" else "step"
        self.update_every = update_every if isinstance(update_every, int) else 1
        self._auto_cadence = update_every == "auto"
        self.targets = list(targets) if targets is not None else None
        self.exclude = list(exclude)
        self.temperature = float(temperature)
        self.rescale_gate = rescale_gate
        if isinstance(tie, str) and tie != "auto":
            raise ValueError(f"tie must be 'auto' or a list of groups of globs, got {tie!r}")
        self.auto_tie = tie == "auto"
        self.selector = Selector(mode, importance, layer_floor, regrow, granularity, () if self.auto_tie else tie)
        if straight_through and not regrow:
            raise ValueError("straight_through=True needs regrow=True: without regrowth a pruned entry never comes "
                             "back, and its scores' gradients would change nothing")
        self.straight_through = bool(straight_through)
        self.mask_lr = mask_lr
        self.mask_weight_decay = mask_weight_decay
        self.fold_on_fit_end = fold_on_fit_end
        self.seed = seed
        self.log_every_n_steps = log_every_n_steps
        self.log_histograms = log_histograms
        self.plots = plots

        self.position: Optional[float] = None  # t of the last mask update
        self.target: float = 0.0  # target of the last update (sparsity, or gate threshold)
        self.pruned: int = 0  # entries pruned by the last update
        self.threshold: Optional[float] = None  # the cut of the last update (see select.Selection)
        self.scores_initialized = False
        self.history: dict[str, list] = {"layers": [], "positions": [], "sparsity": []}  # per update
        self._churn: dict[str, torch.Tensor] = {}
        self._gate_cache = None
        self._logged_step: Optional[int] = None  # step of the last scalar log, not to log a step twice
        self._shown_sparsity: Optional[float] = None  # the progress bar's masks/sparsity, logged when it moves
        self._span = (0.0, 0.0)
        self._masked: list[MaskedTensor] = []
        self._load_hook = None
        self._masked_at_setup = False

    # ----------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_strategy(trainer.strategy)
        self._masked_at_setup = bool(masked_tensors(pl_module))
        self._load_hook = restore_masks_on_load(pl_module)
        if stage != "fit":
            return
        if getattr(self.schedule, "uses_fractions", False) and _unbounded(trainer):
            raise ValueError(
                "the schedule's start/end are fractions of training, but training length is unbounded "
                f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}); set max_epochs or max_steps, "
                "or give the schedule int start/end"
            )
        if self.initializer.needs_grad and not pl_module.automatic_optimization:
            raise ValueError(f"{self.initializer!r} scores one automatic-optimization training step; this module "
                             "uses manual optimization: pick another init")
        attached = not masked_tensors(pl_module)
        groups = _coupled_norms(pl_module) if self.auto_tie else None
        self._masked = self._attach(pl_module) if attached else masked_tensors(pl_module)
        for entry in self._masked:
            entry.gate.straight_through = self.straight_through
        try:
            if groups is not None:
                names = {entry.name for entry in self._masked}
                tie = [kept for group in groups if len(kept := [name for name in group if name in names]) > 1]
                self.selector = dataclasses.replace(self.selector, tie=tie)
                rank_zero_info(f"lightning_masks: tie='auto' ties {len(tie)} groups: {tie}")
            self.selector.check(self._masked)
        except ValueError:
            if attached:
                detach(pl_module)
            raise

    def _attach(self, pl_module: pl.LightningModule) -> list[MaskedTensor]:
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        init = torch.zeros_like if self.initializer.needs_grad else (
            lambda weight: self.initializer(weight, generator=generator))
        masked = attach(pl_module, self.targets, self.exclude, init=init, temperature=self.temperature,
                        rescale=self.rescale_gate, per_channel=self.selector.grain.channel)
        self.scores_initialized = not self.initializer.needs_grad
        total = sum(entry.numel for entry in masked)
        goal = (f"gate threshold up to {self.schedule.final}" if isinstance(self.schedule, ThresholdSchedule)
                else f"final sparsity {self.sparsity}")
        rank_zero_info(f"lightning_masks: masking {len(masked)} tensors ({total:,} weights), "
                       f"init={self.initializer!r}, {goal}")
        return masked

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        place_scores(trainer.optimizers, schedulers, self._masked, self.mask_lr, self.mask_weight_decay)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.scores_initialized:
            self._score_from_one_batch(trainer, pl_module)
        total_steps, steps_per_epoch = _training_length(trainer)
        total = total_steps if self.cadence == "step" else math.ceil(total_steps / steps_per_epoch)
        if self._auto_cadence:
            start, end = resolve_span(self.schedule, self.cadence, total, steps_per_epoch)
            self.update_every = max(1, round((end - start) / AUTO_UPDATES))
        self._span = resolve_span(self.schedule, self.cadence, total, steps_per_epoch, self.update_every)

    def _score_from_one_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialise gradient-based scores (e.g. SNIP) from one training batch of the dense network."""
        batch = next(iter(CombinedLoader(trainer.train_dataloader, "max_size_cycle")))[0]
        batch = trainer.strategy.batch_to_device(batch)
        weights = [entry.weight for entry in self._masked]
        with gates_disabled(self._masked), _logging_disabled(pl_module), torch.enable_grad():
            output = pl_module.training_step(batch, 0)
            loss = output["loss"] if isinstance(output, Mapping) else output
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for entry, grad in zip(self._masked, grads):
            grad = torch.zeros_like(entry.weight) if grad is None else grad
            entry.gate.reset_scores(self.initializer(entry.weight.detach(), grad=grad))
        self.scores_initialized = True

    # ----------------------------------------------------------------------------------------- updates
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cadence == "epoch":
            self._update(trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.cadence == "step" and trainer.global_step % self.update_every == 0:
            self._update(trainer.global_step)

    def _update(self, t: int) -> None:
        if self.position == t:
            return
        target = self.schedule.value(t, *self._span)
        if (self.position is not None and target == self.target and not self.selector.regrow
                and not isinstance(self.schedule, ThresholdSchedule)):
            self.position = t  # the same count with no regrowth: nothing would change
            return
        self.target = target
        if isinstance(self.schedule, ThresholdSchedule):
            selection = self.selector.threshold(self._masked, self.target)
        else:
            selection = self.selector(self._masked, self.target)
        self.pruned, self.threshold, self._churn = selection
        self.position = t
        rows = stats.layer_rows(self._masked)
        self.history["layers"] = [row["name"] for row in rows]
        self.history["positions"].append(t)
        self.history["sparsity"].append([row["sparsity"] for row in rows])

    # ----------------------------------------------------------------------------------------- logging
    @property
    def sparsity_now(self) -> float:
        """The global sparsity, in masked units, after the last update (host value, no sync)."""
        total = sum(entry.units for entry in self._masked)
        return self.pruned / total if total else 0.0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sparsity = self.sparsity_now
        if batch_idx == 0 or sparsity != self._shown_sparsity:  # a log call can cost ~ms: only when it moves
            pl_module.log("masks/sparsity", sparsity, prog_bar=True, logger=False, on_step=True, on_epoch=False)
            self._shown_sparsity = sparsity
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self._log_stats(trainer, histograms=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_stats(trainer, histograms=self.log_histograms)

    def _log_stats(self, trainer: pl.Trainer, histograms: bool) -> None:
        if not (trainer.loggers and trainer.is_global_zero and self._masked):
            return
        if self._logged_step != trainer.global_step:
            self._logged_step = trainer.global_step
            values = stats.mask_stats(self._masked, self._churn)
            numbers = torch.stack([v.float().cpu() for v in values.values()]).tolist()  # the one host sync
            metrics = {f"masks/{key}": number for key, number in zip(values, numbers)}
            metrics["masks/global/target"] = self.target
            if self.threshold is not None:
                metrics["masks/global/threshold"] = self.threshold
            loggers.log_scalars(trainer.loggers, metrics, trainer.global_step)
        if histograms:
            loggers.log_histograms(trainer.loggers, self._histograms(), trainer.global_step)

    def _gate_histograms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per masked tensor, the histogram of its live (kept) gates."""
        return {entry.name: stats.histogram(stats.live_gates(entry)) for entry in self._masked}

    def _histograms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        result = {f"masks/{name}/gates": value for name, value in self._gate_histograms().items()}
        for entry in self._masked:
            scores = entry.gate.scores.detach()
            result[f"masks/{entry.name}/scores"] = stats.histogram(scores, low=scores.min().item(),
                                                                  high=scores.max().item())
        return result

    def _report(self, trainer: pl.Trainer) -> None:
        """The end-of-fit console table, W&B table and summary, and the pictures."""
        rows = stats.layer_rows(self._masked)
        rank_zero_info(stats.format_layer_table(rows))
        if not trainer.loggers:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "masks"  # a collective call: all ranks
        if not trainer.is_global_zero:
            return
        loggers.log_table(trainer.loggers, "masks/layers", rows)
        total = sum(row["total"] for row in rows)
        pruned = total - sum(row["kept"] for row in rows)
        summary = {"masks/final_sparsity": pruned / total, "masks/pruned": pruned, "masks/total": total}
        summary.update({k: float(v) for k, v in trainer.callback_metrics.items() if "acc" in k})
        loggers.log_summary(trainer.loggers, summary)
        if self.plots:
            loggers.log_images(trainer.loggers, self._pictures(folder), trainer.global_step)

    def _pictures(self, folder: Path) -> dict[str, Path]:
        """Write the per-layer sparsity over training and the gate histograms into ``folder``; return them by W&B key."""
        gates = {name: (c.cpu().numpy(), e.cpu().numpy()) for name, (c, e) in self._gate_histograms().items()}
        history = self.history
        return {
            "masks/sparsity_over_training": plots.sparsity_over_training(
                history["layers"], history["sparsity"], history["positions"], folder / "sparsity_over_training.png",
                unit=self.cadence),
            "masks/gate_histograms": plots.gate_histograms(gates, folder / "gate_histograms.png"),
        }

    # ----------------------------------------------------------------------------------------- evaluation
    def _cache_gates(self) -> None:
        """Compute each masked weight once per evaluation loop instead of once per batch."""
        if self._gate_cache is None:
            self._gate_cache = parametrize.cached()
            self._gate_cache.__enter__()

    def _drop_gate_cache(self, *args: Any) -> None:
        if self._gate_cache is not None:
            cache, self._gate_cache = self._gate_cache, None
            cache.__exit__(None, None, None)

    on_validation_start = on_test_start = on_predict_start = override(lambda self, *args: self._cache_gates())
    on_validation_end = on_test_end = on_predict_end = override(_drop_gate_cache)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_gate_cache()
        if self._masked and not self._masked_at_setup and self.position is None:
            detach(pl_module)  # failed before any mask update: give the user back the plain model
            self._masked = []

    # ----------------------------------------------------------------------------------------- the end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._masked:
            self._report(trainer)
        if self.fold_on_fit_end:
            fold(pl_module)
            self._masked = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        if stage != "fit" and self.fold_on_fit_end and not self._masked_at_setup:
            fold(pl_module)  # masks restored from a checkpoint for this evaluation only

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "target": self.target, "pruned": self.pruned,
                "threshold": self.threshold, "scores_initialized": self.scores_initialized,
                "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = state_dict["position"]
        self.target = state_dict["target"]
        self.pruned = state_dict["pruned"]
        self.scores_initialized = state_dict["scores_initialized"]
        self.threshold = state_dict.get("threshold")
        self.history = state_dict.get("history", self.history)


def _check_strategy(strategy: Any) -> None:
    unsupported = isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy))
    if unsupported or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"MaskPruningCallback does not support the {type(strategy).__name__} strategy: it shards or wraps "
            "parameters, which would give wrong masks. Use a single device, 'ddp' or 'ddp_spawn'"
        )


def _unbounded(trainer: pl.Trainer) -> bool:
    return trainer.max_epochs in (None, -1) and trainer.max_steps == -1


def _training_length(trainer: pl.Trainer) -> tuple[float, float]:
    """Return ``(total optimizer steps, optimizer steps per epoch)`` of this fit."""
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches) \
        if math.isfinite(trainer.num_training_batches) else math.inf
    by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
    by_steps = trainer.max_steps if trainer.max_steps != -1 else math.inf
    total = min(by_epochs, by_steps)
    if not math.isfinite(per_epoch):
        per_epoch = total
    return total, max(per_epoch, 1)


class _logging_disabled:
    """Make ``self.log``/``self.log_dict`` no-ops on a module for a block (a step run outside the loop)."""

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.pl_module = pl_module

    def __enter__(self) -> None:
        self.pl_module.log = self.pl_module.log_dict = lambda *args, **kwargs: None

    def __exit__(self, *exc: Any) -> None:
        del self.pl_module.log, self.pl_module.log_dict


def _coupled_norms(pl_module: pl.LightningModule) -> list[list[str]]:
    """The BatchNorm groups of ``tie="auto"``, traced on the module's ``example_input_array``."""
    example = pl_module.example_input_array
    if example is None:
        raise ValueError("tie='auto' traces the model on pl_module.example_input_array, which is not set; set it "
                         "to a batch the model's forward takes, or pass the groups (lightning_masks.coupling."
                         "coupled_channels) as tie=[[...], ...]")
    return coupled_channels(pl_module, example)
