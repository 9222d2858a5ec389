"""MaskPruningCallback: the Lightning glue around masks, initializers, schedules and selection."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from . import loggers, plots, stats
from .budget import DEFAULT_UPDATE_SHARE
from .companions import end_process_group_at_exit, frozen_by_finetuning, mask_copies, refreeze
from .coupling import coupled_channels
from .init import InitSpec, get_initializer
from .kinds import kind_of
from .masks import (
    SCORE_DTYPES,
    MaskedTensor,
    Targets,
    TargetSpec,
    attach_resolved,
    cached_gates,
    detach,
    fold,
    gates_disabled,
    masked_tensors,
    resolve_targets,
    restore_masks_on_load,
)
from .optim import place_scores
from .outputs import output_layers as find_output_layers
from .plan import EARLY_END, Plan
from .schedule import ScheduleSpec, ThresholdSchedule, get_schedule
from .select import Selector

__all__ = ["MaskPruningCallback"]

DEFAULT_SPARSITY = 0.9
# the loose selection arguments' defaults: the Selector's own
_SELECTION_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Selector)}


class MaskPruningCallback(Callback):
    """Prune any LightningModule with learnable, weight-dependent masks ``w * sigmoid(scores / T) * keep``.

    Once the module is built (after ``setup`` and ``configure_model``, before the optimizers exist, so an
    unmodified ``configure_optimizers`` trains them) the selected weights get masks whose scores ``init``
    derives from the weights; the keep-masks follow
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
        update_budget: under ``"auto"``, the most that mask updates may take of the training time (default 0.05):
            from the measured mean update and step times (:class:`~lightning_masks.budget.UpdateBudget`), the
            interval is widened where needed (short fits of small models), rank zero deciding for all. ``None``:
            the ~100 updates whatever they cost. The interval then depends on timings: for runs that must repeat
            bit for bit, pass ``update_every=N`` or ``update_budget=None``.
        targets, exclude: what to mask: globs on module names (the module's weights, whatever its type), globs
            on tensor names, or module types (see :func:`~lightning_masks.masks.resolve_targets`). Default: the
            weights of every registered layer kind (:func:`~lightning_masks.kinds.list_layer_kinds`: Linear,
            Conv and ConvTranspose 1d/2d/3d, MultiheadAttention projections, RNN/LSTM/GRU, transformers'
            ``Conv1D``) except embedding tables and tensors tied to one (name them in ``targets`` to mask them).
            The setup line lists what is left dense; trainable weight matrices left dense for no stated reason
            get a warning. One string is one glob. Tensors frozen at setup are left unmasked (the
            setup line names them), except those a ``BaseFinetuning`` callback froze.
        init_kwargs: options for a named ``init`` (e.g. ``{"noise_scale": 0.1}``).
        temperature: the gate's ``T > 0``.
        rescale_gate: divide each gate by its initial value so training starts from the dense function
            (on by default: benchmarks/results/study_lenet300_s99.md); with ``compact``, by one scalar per tensor,
            ``1 / mean(sigmoid(scores / T))``.
        score_dtype: the dtype of the scores, hence of their gradient and optimizer state: ``"bfloat16"`` (the
            default), ``"float32"``, ``"float64"`` or a ``torch.dtype``; ``None`` takes the weight's. Never wider
            than the weight; the gate is computed in the weight's dtype.
        compact: hold the keep bits in the scores (a pruned entry's score is a sentinel whose gate is exactly
            0) and the rescale as one scalar per tensor, instead of a bool and a float per weight. With
            ``score_dtype="bfloat16"`` and Adam a masked weight then carries 8 bytes of mask state (scores, their
            gradient, two Adam moments) instead of 21. ``regrow=True`` needs the pruned entries' scores, so it
            keeps the keep buffer whatever this says.
        selector: how scores become keep-masks, one :class:`~lightning_masks.select.Selector` (ranking ``mode``,
            ``importance``, ``layer_floor``, ``regrow``, ``granularity``, ``tie``); default ``Selector()``.
        mode, importance, layer_floor, regrow, granularity, tie: the same fields one by one (the selector's, when
            ``selector`` is not given; giving both is refused).
        straight_through: pruned entries' scores keep learning, their gradient taken as if they were kept
            (straight-through, movement pruning: :func:`~lightning_masks.masks.straight_through_gated`), so that
            with ``regrow=True`` a pruned weight whose gate the loss raises can come back. Needs ``regrow=True``.
            Off by default (benchmarks/README.md, issue 16: what it gained at 99 / 99.5%).
        output_layers: with ``granularity="channel"``, the layers left whole because their output units are
            the model's outputs (classes, vocabulary). ``"auto"``: the masked layers whose outputs reach the
            model's outputs through no other masked layer, traced on ``forward(example_input_array)`` or, when
            that is not set, on the loss of the first training batch (:func:`~lightning_masks.outputs.output_layers`);
            a list of globs on module names; or ``None`` to prune them too.
            ``tie``: groups of globs on masked tensor names pruned together unit by unit, e.g. the BatchNorms
            that add into one residual stream, so that export can remove the stream's pruned channels.
            ``"auto"``: the masked BatchNorms whose channels meet in a sum
            (:func:`~lightning_masks.coupling.coupled_channels` on the module's ``example_input_array``).
        mask_lr, mask_weight_decay: learning rate and weight decay of the scores, in their own param group of
            the optimizer that trains the weight (default ``mask_lr=0.01``, the weight decay of the weight's
            group). Both ``None`` leaves the scores where ``configure_optimizers`` put them.
        fused_adam: switch the CPU ``Adam``/``AdamW`` param groups that train scores or masked weights, and whose
            ``foreach``/``fused`` you left unset, to torch's fused kernel (``fused=True``): the same update up to
            float rounding, several times faster on the exactly-zero gradients of pruned entries
            (:func:`~lightning_masks.optim.place_scores`). ``False`` leaves your optimizer's groups as they are.
        fold_on_fit_end: leave a plain model (no parametrizations, exact zeros) when fit ends.
        early_end: a fit that ends before its ramp does (EarlyStopping, ``max_time``, an exception): ``"warn"``
            (the default) warns with the target and the sparsity reached and folds what was reached; ``"final"``
            makes one last update to the final target first (not after an exception).
        seed: seed for random initializers; ``None`` uses torch's global generator.
        log_every_n_steps: cadence of the ``masks/...`` scalars during training (``None``: the Trainer's;
            0: only as each epoch ends). Statistics are computed (and synced to the host) only then.
        log_histograms: log gate and score histograms (TensorBoard, W&B) as each epoch ends.
        plots: at the end of fit, write each layer's sparsity over training and gate histograms (PNG) into the
            run folder and log them to W&B.

    Raises:
        ValueError: any argument of the wrong type or out of range, or an inverted ramp, at construction; an
            unsupported strategy, a target that matches nothing, NaN/Inf weights or an unbounded training length,
            in ``setup`` (or as ``configure_model`` ends, for what only the built module can tell).

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
        update_budget: Optional[float] = DEFAULT_UPDATE_SHARE,
        targets: Optional[Iterable[TargetSpec]] = None,
        exclude: Iterable[TargetSpec] = (),
        init_kwargs: Optional[Mapping[str, Any]] = None,
        temperature: float = 1.0,
        rescale_gate: bool = True,
        score_dtype: Union[str, torch.dtype, None] = "bfloat16",
        compact: bool = True,
        selector: Optional[Selector] = None,
        mode: str = "global",
        importance: str = "effective_weight",
        layer_floor: float = 0.25,
        regrow: bool = False,
        straight_through: bool = False,
        granularity: str = "element",
        tie: Union[str, Iterable[Iterable[str]]] = (),
        output_layers: Union[str, Iterable[str], None] = "auto",
        mask_lr: Optional[float] = 1e-2,
        mask_weight_decay: Optional[float] = None,
        fused_adam: bool = True,
        fold_on_fit_end: bool = True,
        early_end: str = "warn",
        seed: Optional[int] = None,
        log_every_n_steps: Optional[int] = None,
        log_histograms: bool = True,
        plots: bool = True,
    ) -> None:
        if sparsity is not None:  # None: the default (or N:M's)
            _check_number("sparsity", sparsity, 0.0, 1.0, high_open=True, hint="e.g. sparsity=0.9 prunes 90%")
        if update_every not in ("auto", "epoch") and not (_is_int(update_every) and update_every > 0):
            raise ValueError(f"update_every must be 'auto', 'epoch' or a positive int (steps), got {update_every!r}")
        targets, exclude = _check_targets("targets", targets, optional=True), _check_targets("exclude", exclude)
        if init_kwargs is not None and not isinstance(init_kwargs, Mapping):
            raise ValueError(f"init_kwargs must be a mapping of the initializer's options or None, got "
                             f"{init_kwargs!r}; e.g. init_kwargs={{'noise_scale': 0.1}}")
        _check_number("temperature", temperature, 0.0, math.inf, low_open=True, hint="try 1.0 (lower is a harder gate)")
        loose = {"mode": mode, "importance": importance, "layer_floor": layer_floor, "regrow": regrow,
                 "granularity": granularity, "tie": tie}
        if selector is not None:
            if not isinstance(selector, Selector):
                raise ValueError(f"selector must be a lightning_masks.Selector, got {selector!r}")
            given = [name for name, value in loose.items() if _normalized(value) != _SELECTION_DEFAULTS[name]]
            if given:
                raise ValueError(f"the selection is given twice: selector={selector!r} and {given}; put them in the "
                                 f"Selector (e.g. Selector(granularity='channel')) or drop selector=")
        else:
            for name, value in (("mode", mode), ("importance", importance), ("granularity", granularity)):
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string, got {value!r}; see lightning_masks.select.Selector")
            _check_number("layer_floor", layer_floor, 0.0, 1.0,
                          hint="e.g. layer_floor=0.25 (a float); 0 disables the floor")
            selector = Selector(mode, importance, layer_floor, regrow, granularity,
                                tie if isinstance(tie, str) else tuple(tie))
        for name, value in (("mask_lr", mask_lr), ("mask_weight_decay", mask_weight_decay)):
            _check_number(name, value, 0.0, math.inf, optional=True, hint=f"e.g. {name}=0.01 (a float, not a string)")
        if early_end not in EARLY_END:
            raise ValueError(f"early_end must be one of {list(EARLY_END)}, got {early_end!r}")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if log_every_n_steps is not None and not (_is_int(log_every_n_steps) and log_every_n_steps >= 0):
            raise ValueError(f"log_every_n_steps must be an int >= 0 or None, got {log_every_n_steps!r}; 0 logs "
                             "only as each epoch ends")
        for name, value in (("rescale_gate", rescale_gate), ("fold_on_fit_end", fold_on_fit_end),
                            ("fused_adam", fused_adam),
                            ("log_histograms", log_histograms), ("plots", plots)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        nm_sparsity = selector.grain.sparsity
        if nm_sparsity is not None and sparsity is not None and not math.isclose(sparsity, nm_sparsity):
            raise ValueError(f"granularity {selector.granularity!r} fixes sparsity at {nm_sparsity}, got "
                             f"sparsity={sparsity}; "
                             "leave sparsity unset")
        final = sparsity if sparsity is not None else (nm_sparsity if nm_sparsity is not None else DEFAULT_SPARSITY)

        self.sparsity = final
        self.initializer = get_initializer(init, **dict(init_kwargs or {}))
        ramp = {"start": start, "end": end, "unit": "epoch"} if isinstance(schedule, str) else {}
        self.schedule = get_schedule(schedule, final, **ramp)
        self.targets = targets
        self.exclude = exclude
        self.temperature = float(temperature)
        self.rescale_gate = rescale_gate
        self.score_dtype = _score_dtype(score_dtype)
        self.compact = compact
        self._clock: Optional[float] = None  # when the last step started (after its update), for the budget
        if isinstance(output_layers, str) and output_layers != "auto":
            raise ValueError(f"output_layers must be 'auto', None or a list of globs on module names, got "
                             f"{output_layers!r}; e.g. output_layers=['head']")
        self.output_layers = output_layers if output_layers in ("auto", None) else list(output_layers)
        self.selector = selector
        if straight_through and not selector.regrow:
            raise ValueError("straight_through=True needs regrow=True: without regrowth a pruned entry never comes "
                             "back, and its scores' gradients would change nothing")
        self.straight_through = bool(straight_through)
        self.mask_lr = mask_lr
        self.mask_weight_decay = mask_weight_decay
        self.fused_adam = fused_adam
        self.fold_on_fit_end = fold_on_fit_end
        self.seed = seed
        self.log_every_n_steps = log_every_n_steps
        self.log_histograms = log_histograms
        self.plots = plots

        # this fit's lifecycle (plan.py)
        self.plan = Plan(self.schedule, update_every, selector.regrow, early_end, update_budget)
        self.scores_initialized = False
        self._churn: dict[str, torch.Tensor] = {}
        self._gate_cache = None
        self._logged_step: Optional[int] = None  # step of the last scalar log, not to log a step twice
        self._shown_sparsity: Optional[float] = None  # the progress bar's masks/sparsity, logged when it moves
        self._masked: list[MaskedTensor] = []
        self._load_hook = None
        self._masked_at_setup = False

    # the plan's state, read (and set) on the callback as before
    position = property(lambda self: self.plan.position, lambda self, v: setattr(self.plan, "position", v),
                        doc="Position (epoch index or global step) of the last mask update, ``None`` before the first.")
    target = property(lambda self: self.plan.target, lambda self, v: setattr(self.plan, "target", v),
                      doc="Target of the last update (sparsity, or gate threshold).")
    pruned = property(lambda self: self.plan.pruned, lambda self, v: setattr(self.plan, "pruned", v),
                      doc="Units pruned by the last update.")
    threshold = property(lambda self: self.plan.threshold, doc="The cut of the last update (select.Selection).")
    history = property(lambda self: self.plan.history, doc="Per update: positions and per-layer sparsity.")
    cadence = property(lambda self: self.plan.cadence, doc="``'epoch'`` or ``'step'``: what a position counts.")
    update_every = property(lambda self: self.plan.every, doc="Optimizer steps between updates (step cadence).")

    # ----------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_strategy(trainer.strategy)
        self._masked_at_setup = bool(masked_tensors(pl_module))
        self._load_hook = restore_masks_on_load(pl_module)
        if stage != "fit":
            return
        self.plan = self.plan.fresh()  # each fit starts a new lifecycle; a resume loads its state after setup
        self._shown_sparsity = self._logged_step = None
        self._churn = {}
        if getattr(self.schedule, "uses_fractions", False) and _unbounded(trainer):
            raise ValueError(
                "the schedule's start/end are fractions of training, but training length is unbounded "
                f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}); set max_epochs or max_steps, "
                "or give the schedule int start/end"
            )
        if self.initializer.needs_grad and not pl_module.automatic_optimization:
            raise ValueError(f"{self.initializer!r} scores one automatic-optimization training step; this module "
                             "uses manual optimization: pick another init")
        _after_configure_model(pl_module, lambda: self._mask(trainer, pl_module))

    def _mask(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the masks to the built module (after ``setup`` and ``configure_model``, before the optimizers,
        the checkpoint restore and the DDP wrapper), or adopt the ones it has; check them against the selector."""
        attached = not masked_tensors(pl_module)
        groups = _coupled_norms(pl_module) if self.selector.auto_tie else None
        with frozen_by_finetuning(trainer, pl_module) as thawed:  # a BaseFinetuning's frozen tensors are masked too
            self._masked = self._attach(trainer, pl_module) if attached else masked_tensors(pl_module)
        refreeze(self._masked, thawed)
        for entry in self._masked:
            entry.gate.straight_through = self.straight_through
        try:
            if groups is not None:
                names = {entry.name for entry in self._masked}
                tie = [kept for group in groups if len(kept := [name for name in group if name in names]) > 1]
                self.selector = dataclasses.replace(self.selector, tie=tie)
                rank_zero_info(f"lightning_masks: tie='auto' ties {len(tie)} groups: {tie}")
                if not tie:
                    rank_zero_warn("lightning_masks: tie='auto' tied nothing: it ties masked BatchNorms whose channels "
                                   "meet in a sum, and none is masked; add them to targets (e.g. targets=[nn.Linear, "
                                   "nn.Conv2d, nn.BatchNorm2d]) or drop tie='auto'")
            self.selector.check(self._masked)
        except ValueError:
            if attached:
                detach(pl_module)
            raise
        mask_copies(trainer, pl_module)  # e.g. StochasticWeightAveraging's copy, made in its setup before ours

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[MaskedTensor]:
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        init = torch.zeros_like if self.initializer.needs_grad else (
            lambda weight: self.initializer(weight, generator=generator))
        exclude = self.exclude + self._outputs_kept_whole(trainer, pl_module)
        resolved = resolve_targets(pl_module, self.targets, exclude)
        masked = attach_resolved(pl_module, resolved, self.targets, init=init, temperature=self.temperature,
                                 rescale=self.rescale_gate, per_channel=self.selector.grain.channel,
                                 score_dtype=self.score_dtype, compact=self.compact and not self.selector.regrow)
        self.scores_initialized = not self.initializer.needs_grad
        total = sum(entry.numel for entry in masked)
        goal = (f"gate threshold up to {self.schedule.final}" if isinstance(self.schedule, ThresholdSchedule)
                else f"final sparsity {self.sparsity}")
        rank_zero_info(f"lightning_masks: masking {len(masked)} tensors ({total:,} weights), "
                       f"init={self.initializer!r}, {goal}{_left_dense(resolved, exclude[len(self.exclude):])}")
        if resolved.unmasked:
            rank_zero_warn(f"lightning_masks: {len(resolved.unmasked)} trainable weight matrices are left dense "
                           f"(no registered layer kind): {stats.short_names(resolved.unmasked)}. Name them in "
                           "`targets`, or register their layer with lightning_masks.register_layer_kind")
        if resolved.foreign:
            rank_zero_warn(f"lightning_masks: {len(resolved.foreign)} layers are left dense because something else "
                           f"already computes their weight: {stats.short_names(resolved.foreign)}. To mask them, "
                           "remove "
                           "that first (torch.nn.utils.parametrize.remove_parametrizations, prune.remove)")
        return masked

    def _outputs_kept_whole(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """With channel masks, the layers whose output units are the model's outputs (see ``output_layers``)."""
        if not self.selector.grain.channel or not self.output_layers:
            return []
        names = [name for name, _ in pl_module.named_modules()]
        if self.output_layers != "auto":
            for pattern in self.output_layers:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    raise ValueError(f"output_layers pattern {pattern!r} matches no module of the model; globs match "
                                     f"module names such as {names[-1]!r}")
            return list(self.output_layers)
        targeted = resolve_targets(pl_module, self.targets)
        owners = {id(m) for found in targeted.chosen.values() for m, _ in found}
        named = {id(m) for name in targeted.named for m, _ in targeted.chosen[name]}  # explicit targets win
        # Every layer that could carry a mask, excluded ones too: an output layer is the last of them on its path.
        candidates = {name: module for name, module in pl_module.named_modules()
                      if kind_of(module) is not None or id(module) in owners}
        run = _one_pass(trainer, pl_module)
        found = find_output_layers(candidates, run) if run is not None else []
        if not found:
            rank_zero_warn("lightning_masks: granularity='channel' could not find the layers that produce the model's "
                           "outputs (they are kept whole, so no class or token loses its logit): set "
                           "pl_module.example_input_array, or name them with output_layers=[...] (None prunes them)")
        return [name for name in found if id(candidates[name]) not in named]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mask_copies(trainer, pl_module)  # copies made by other callbacks before the masks existed
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        place_scores(trainer.optimizers, schedulers, self._masked, self.mask_lr, self.mask_weight_decay,
                     fuse=self.fused_adam)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.scores_initialized:
            self._score_from_one_batch(trainer, pl_module)
        self.plan.resolve(*_training_length(trainer))

    def _score_from_one_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialise gradient-based scores (e.g. SNIP) from one training batch of the dense network."""
        batch = next(iter(CombinedLoader(trainer.train_dataloader, "max_size_cycle")))[0]
        batch = trainer.strategy.batch_to_device(batch)
        weights = [entry.weight for entry in self._masked]
        with gates_disabled(self._masked), torch.enable_grad():
            grads = torch.autograd.grad(_training_loss(pl_module, batch), weights, allow_unused=True)
        for entry, grad in zip(self._masked, grads):
            grad = torch.zeros_like(entry.weight) if grad is None else grad
            entry.gate.reset_scores(self.initializer(entry.weight.detach(), grad=grad))
        self.scores_initialized = True

    # ----------------------------------------------------------------------------------------- updates
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock = None  # the budget times steps within an epoch (not the validation between)
        self._update(trainer, self.plan.due(trainer.current_epoch, trainer.global_step, epoch_start=True))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        started = time.perf_counter()
        updated = self._update(trainer, self.plan.due(trainer.current_epoch, trainer.global_step, epoch_start=False))
        if self.plan.budgeted:
            self._account(trainer, started, updated)

    def _account(self, trainer: pl.Trainer, started: float, updated: bool) -> None:
        """The update budget: time the step just ended and the update just made; where updates would take more
        than their share, widen the interval (rank zero's decision, broadcast, so every rank updates alike)."""
        now = time.perf_counter()
        step = None if self._clock is None else (started - self._clock) * trainer.accumulate_grad_batches
        self._clock = now
        self.plan.account(step, now - started if updated else None)
        if updated:
            wanted = trainer.strategy.broadcast(self.plan.wanted_interval(trainer.global_step))
            self.plan.widen(trainer.global_step, wanted)

    def _update(self, trainer: pl.Trainer, t: Optional[float]) -> bool:
        """Make the update due at ``t`` (if any); return whether a selection ran."""
        target = self.plan.decide(t)
        if target is not None:
            self._select(trainer, t, target)
        return target is not None

    def _select(self, trainer: pl.Trainer, t: float, target: float) -> None:
        """Set the keep-masks to ``target`` (a sparsity, or a gate threshold) and record the update at ``t``."""
        select = self.selector.threshold if self.plan.by_threshold else self.selector
        pruned, threshold, self._churn = select(self._masked, target)
        rows = stats.layer_rows(self._masked)
        self.plan.record(t, target, pruned, threshold, [row["name"] for row in rows], [row["sparsity"] for row in rows])
        mask_copies(trainer, trainer.lightning_module)

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
            scores = entry.gate.scores.detach()[entry.gate.keep].float()  # the live ones: a pruned one may be -2^126
            if scores.numel():
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
        """Write the per-layer sparsity over training and the gate histograms into ``folder``; return them by key."""
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
            self._gate_cache = cached_gates()
            self._gate_cache.__enter__()

    def _drop_gate_cache(self, *args: Any) -> None:
        if self._gate_cache is not None:
            cache, self._gate_cache = self._gate_cache, None
            cache.__exit__(None, None, None)

    on_validation_start = on_test_start = on_predict_start = override(lambda self, *args: self._cache_gates())
    on_validation_end = on_test_end = on_predict_end = override(_drop_gate_cache)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _restore_configure_model(pl_module)
        self._drop_gate_cache()
        if self._masked and not self._masked_at_setup and self.position is None:
            detach(pl_module)  # failed before any mask update: give the user back the plain model
            self._masked = []
        elif self._masked and self.position is not None:
            self._end_short(trainer, jump=False)  # warn with what was reached
            if self.fold_on_fit_end:
                fold(pl_module)
                self._masked = []

    # ----------------------------------------------------------------------------------------- the end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._masked:
            self._end_short(trainer, jump=True)
            self._report(trainer)
        if self.fold_on_fit_end:
            fold(pl_module)
            self._masked = []

    def _end_short(self, trainer: pl.Trainer, jump: bool) -> None:
        """A fit that ended before its ramp: one last update to the final target (``early_end="final"``), or warn."""
        shortfall = self.plan.shortfall()
        if shortfall is None:
            return
        final = self.plan.end_target() if jump else None
        if final is not None:
            reached = self.sparsity_now
            self._select(trainer, self.position if self.position is not None else trainer.global_step, final)
            rank_zero_info(shortfall.message(reached, f"early_end='final' made the last update to the final target "
                                                      f"({self.sparsity_now:.2%} now)"))
            return
        action = ("the model is folded as it is" if self.fold_on_fit_end else "the masks stay as they are") + \
            ("; pass early_end='final' to jump to the final target when a fit ends early" if jump else "")
        rank_zero_warn(shortfall.message(self.sparsity_now, action))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _restore_configure_model(pl_module)
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        if stage != "fit" and self.fold_on_fit_end and not self._masked_at_setup:
            fold(pl_module)  # masks restored from a checkpoint for this evaluation only
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):  # a worker of ddp_spawn (or fork)
            if stage == "fit" and self._masked:
                # The main process loads this state dict into its plain model, non-strictly: masked keys would be
                # dropped. Folded, it gets the trained function with its exact zeros (the worker's model ends here).
                fold(pl_module)
                self._masked = []
        end_process_group_at_exit()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.plan.state_dict(), "scores_initialized": self.scores_initialized}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan.load_state_dict(state_dict)
        self.scores_initialized = state_dict["scores_initialized"]


def _score_dtype(spec: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``score_dtype`` as a ``torch.dtype`` (or ``None``); raises ``ValueError`` naming the allowed values."""
    allowed = {str(d).removeprefix("torch."): d for d in SCORE_DTYPES}
    dtype = allowed.get(spec.removeprefix("torch."), spec) if isinstance(spec, str) else spec
    if dtype is not None and dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {sorted(allowed)}, a torch.dtype among them, or None (the "
                         f"weight's dtype), got {spec!r}")
    return dtype


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                  optional: bool = False, hint: str = "") -> None:
    """Raise a ValueError naming ``name``, ``value``, the range and ``hint`` unless ``value`` is a number in range."""
    if value is None and optional:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and (low < value if low_open else low <= value) and (value < high if high_open else value <= high):
        return
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if high == math.inf:
        interval = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        interval = "in " + interval
    given = repr(value) if number else f"{value!r}, a {type(value).__name__}: pass a number"
    raise ValueError(f"{name} must be {interval}{' or None' if optional else ''}, got {given}"
                     f"{'; ' + hint if hint else ''}")


def _check_targets(name: str, value: Any, optional: bool = False) -> Optional[list]:
    """A list of target specs from ``value``: one glob string is one glob, not its letters."""
    if value is None and optional:
        return None
    specs = [value] if isinstance(value, (str, type)) else value
    if isinstance(specs, Iterable) and not isinstance(specs, Mapping):
        specs = list(specs)
        if all(isinstance(spec, (str, type)) for spec in specs):
            return specs
    raise ValueError(f"{name} must be a glob on qualified names, a module type, or a list of them"
                     f"{' or None' if optional else ''}, got {value!r}; e.g. {name}=['encoder.*', torch.nn.Linear]")


def _normalized(value: Any) -> Any:
    """A selection argument as its default is written (a list of tie groups as a tuple)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


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


def _after_configure_model(pl_module: pl.LightningModule, then: Callable[[], None]) -> None:
    """Make the module's next ``configure_model`` call ``then()`` once it has run.

    Lightning builds layers in ``LightningModule.setup`` and ``configure_model`` after every callback's ``setup``,
    then restores the checkpoint, wraps the module (DDP) and creates the optimizers: masks attached right after
    ``configure_model`` see every layer and are in place for all of that. The wrapper is an instance attribute
    (so Lightning calls it even when the class does not override the hook) that removes itself when called.
    """
    _restore_configure_model(pl_module)
    build = pl_module.configure_model

    def configure_model() -> None:
        _restore_configure_model(pl_module)
        build()
        then()

    configure_model.masks_wrapper = True
    pl_module.configure_model = configure_model


def _restore_configure_model(pl_module: pl.LightningModule) -> None:
    """Remove the wrapper of :func:`_after_configure_model`, if it is still there."""
    if getattr(pl_module.__dict__.get("configure_model"), "masks_wrapper", False):
        del pl_module.configure_model


def _forward(pl_module: pl.LightningModule, example: Any) -> Any:
    """``pl_module(example)`` as Lightning calls it: a tuple or list as positional inputs, a dict as keyword ones."""
    if isinstance(example, Mapping):
        return pl_module(**example)
    return pl_module(*example) if isinstance(example, (tuple, list)) else pl_module(example)


def _first_batch(trainer: pl.Trainer) -> Any:
    """The first batch of the fit's training data (from the datamodule, the module or the loaders passed to fit)."""
    loaders = trainer.fit_loop._data_source.dataloader()
    return next(iter(CombinedLoader(loaders, "max_size_cycle")))[0]


def _one_pass(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Callable[[], Any]]:
    """One pass of the model to trace: ``forward(example_input_array)``, else the loss of the first training
    batch; ``None`` when neither can run (no example input, no training data)."""
    # Layers built in configure_model may already sit on the accelerator, the data does not yet.
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    example = pl_module.example_input_array
    if example is not None:
        return lambda: _forward(pl_module, move_data_to_device(example, device))
    try:
        batch = move_data_to_device(_first_batch(trainer), device)
    except Exception:  # no training data reachable before fit: the caller warns
        return None

    return lambda: _training_loss(pl_module, batch)


def _training_loss(pl_module: pl.LightningModule, batch: Any) -> Any:
    """The loss of one ``training_step`` on ``batch``, run outside the loop (its ``self.log`` calls are no-ops)."""
    with _logging_disabled(pl_module):
        output = pl_module.training_step(batch, 0)
    return output["loss"] if isinstance(output, Mapping) else output


def _left_dense(resolved: Targets, outputs: list[str]) -> str:
    """The setup line's tail: what is left dense by rule, and how to include it."""
    parts = []
    if resolved.embeddings:
        example = resolved.embeddings[0].split(" = ")[0]
        parts.append(f"embedding tables and tensors tied to them left dense: {stats.short_names(resolved.embeddings)} "
                     f"(to mask them, name them in targets, e.g. targets=[..., {example!r}])")
    if outputs:
        parts.append(f"output layers kept whole by channel pruning: {stats.short_names(outputs)} "
                     "(output_layers=None prunes them)")
    if resolved.frozen:
        parts.append(f"frozen tensors (requires_grad=False at setup) left dense: {stats.short_names(resolved.frozen)}; "
                     "to mask them, make them trainable before fit, or freeze them with a BaseFinetuning callback "
                     "(e.g. BackboneFinetuning), whose frozen tensors are masked")
    return "".join(f"; {part}" for part in parts)


def _coupled_norms(pl_module: pl.LightningModule) -> list[list[str]]:
    """The BatchNorm groups of ``tie="auto"``, traced on the module's ``example_input_array``."""
    example = pl_module.example_input_array
    if example is None:
        raise ValueError("tie='auto' traces the model on pl_module.example_input_array, which is not set; set it "
                         "to a batch the model's forward takes, or pass the groups (lightning_masks.coupling."
                         "coupled_channels) as tie=[[...], ...]")
    return coupled_channels(pl_module, example)
