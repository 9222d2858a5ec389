"""MaskPruningCallback: the Lightning glue around masks, initializers, schedules and selection.

The hooks are thin: argument checks are in :mod:`~lightning_masks.lightning.arguments`, the fit's lifecycle in
:mod:`~lightning_masks.lifecycle.plan`, what is read from the Trainer and run outside its loop in
:mod:`~lightning_masks.lightning.trainer`, what the fit logs and prints in
:mod:`~lightning_masks.lightning.fit_report`, other callbacks' copies in :mod:`~lightning_masks.lightning.companions`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Mapping, Optional, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from .._checks import check_flags
from ..lifecycle import Plan, Schedule, ScheduleSpec, get_schedule
from ..masking import (
    GumbelPatterns,
    InitSpec,
    MaskedTensor,
    MaskState,
    RelaxedGroups,
    TargetSpec,
    attach,
    cached_gates,
    detach,
    fold,
    gates_disabled,
    get_initializer,
    input_norms,
    is_sharded,
    kept_whole,
    local_entries,
    masked_tensors,
    masks_hidden,
    plain_saves,
    reduce_to,
    remove_plain_saves,
    resolve_targets,
    restore_masks_on_load,
    shard_with_weights,
    standardized,
)
from ..selection import Selector, ties_among
from . import fit_report, loggers, sharding
from .arguments import (
    check_output_layers,
    check_relaxed_init,
    check_relaxed_schedule,
    check_settings,
    check_targets,
    final_sparsity,
    instance_of,
    refuse_flat_fields,
    refuse_misplaced,
    warn_relaxed_gates,
)
from .companions import end_process_group_at_exit, frozen_by_finetuning, mask_copies, refreeze, warn_inner_copies
from .fit_report import MaskLogging
from .optim import MaskOptimizer, ScoreOptimizers
from .trainer import (
    after_configure_model,
    check_strategy,
    coupled_norms,
    first_batch,
    one_pass,
    restore_configure_model,
    restore_configure_optimizers,
    step_clock,
    training_batches,
    training_length,
    training_loss,
    unbounded,
    within_configure_optimizers,
)

__all__ = ["MaskPruningCallback"]

_DEFAULT_SPARSITY = 0.9

#: the callback's arguments that take a strategy object, and its class
_STRATEGIES = {"schedule": Schedule, "selector": Selector, "state": MaskState, "optimizer": MaskOptimizer,
               "logging": MaskLogging}


class MaskPruningCallback(Callback):
    """Prune any LightningModule with learnable, weight-dependent masks ``w * sigmoid(scores / T) * keep``.

    Once the module is built (after ``setup`` and ``configure_model``, before the optimizers exist, so an
    unmodified ``configure_optimizers`` trains them) the selected weights get masks whose scores ``init``
    derives from the weights; the keep-masks follow
    ``schedule`` up to ``sparsity``; at the end of fit the masks are folded into plain weights with
    exact zeros.

    Args:
        sparsity: final fraction of pruned entries, in [0, 1). Default 0.9 (or ``1 - N/M`` for N:M).
        init: initializer name (see :func:`~lightning_masks.masking.initializers.list_initializers`), an
            :class:`~lightning_masks.masking.initializers.Initializer`, or a callable ``weight -> scores``.
        schedule: a shape name (``cubic``, ``linear``, ...: :func:`~lightning_masks.list_schedules`; the default ramp
            over the first two thirds of training and the default cadence), a
            :class:`~lightning_masks.lifecycle.schedule.Schedule` (its ``start``/``end`` ramp in ``int`` epochs or
            steps or ``float`` fractions of training, and its cadence: ``update_every``, ``update_budget``,
            ``early_end``; a :class:`~lightning_masks.lifecycle.schedule.ThresholdSchedule` prunes by gate
            threshold), or a callable ``t -> sparsity`` with ``t`` the epoch index or global step (a
            :class:`~lightning_masks.lifecycle.schedule.CallableSchedule` gives it a cadence).
        selector: how scores become keep-masks, a :class:`~lightning_masks.Selector`: ranking ``mode``,
            ``importance``, ``layer_floor``, ``regrow`` and ``straight_through``, ``granularity`` (element,
            channel, N:M), ``tie``; default ``Selector()``.
        state: the gate and its state, a :class:`~lightning_masks.MaskState`: ``temperature``, ``rescale_gate``,
            ``score_dtype``, ``compact``; default ``MaskState()`` (bfloat16 scores, one rescale scalar a tensor:
            8.125 bytes of mask state a masked weight under Adam).
        optimizer: how the scores train, a :class:`~lightning_masks.MaskOptimizer`: ``lr`` (default 0.01),
            ``weight_decay``, ``fused_adam``. ``configure_optimizers`` runs on the plain model; the scores ride in
            the param group of their weight and a copy of that optimizer steps them at these settings.
        logging: what the fit logs, a :class:`~lightning_masks.MaskLogging`: ``every_n_steps``, ``histograms``,
            ``plots``.
        targets, exclude: what to mask: globs on module names (the module's weights, whatever its type), globs
            on tensor names, or module types (see :func:`~lightning_masks.masking.masks.resolve_targets`). Default: the
            weights of every registered layer kind (:func:`~lightning_masks.masking.kinds.list_layer_kinds`: Linear,
            Conv and ConvTranspose 1d/2d/3d, MultiheadAttention projections, RNN/LSTM/GRU, transformers'
            ``Conv1D``) except embedding tables and tensors tied to one (name them in ``targets`` to mask them).
            The setup line lists what is left dense; trainable weight matrices left dense for no stated reason
            get a warning. One string is one glob. What happens to frozen tensors is ``frozen``'s.
        frozen: the targeted tensors frozen at setup (``requires_grad=False``, or frozen by a ``BaseFinetuning``
            callback such as ``BackboneFinetuning``): ``"skip"`` (the default) leaves those frozen by hand dense
            and masks those a ``BaseFinetuning`` froze, their scores frozen and unfrozen with them. ``"mask"`` and
            ``"gate"`` learn masks over all of them while the weights themselves stay as they are (fine-pruning a
            frozen backbone; piggyback, supermasks): their scores train from the first step. ``"mask"``: binary
            masks (the network computes ``w * keep``, :func:`~lightning_masks.masking.gate.binary_gated`), so that
            the folded model holds every kept weight bit for bit and exact zeros elsewhere. ``"gate"``: the soft
            gate as for trained weights (``w * gate * keep``), which also learns a scale for each kept weight:
            more accurate (benchmarks/results/finepruning_lenet300.md), but the folded weights are the scaled
            ones. The setup line says which.
        output_layers: with ``Selector(granularity="channel")``, the layers left whole because their output units are
            the model's outputs (classes, vocabulary). ``"auto"``: the masked layers whose outputs reach the
            model's outputs through no other masked layer, traced on ``forward(example_input_array)`` or, when
            that is not set, on the loss of the first training batch
            (:func:`~lightning_masks.masking.outputs.output_layers`); a list of globs on module names; or ``None`` to
            prune them too.
        fold_on_fit_end: leave a plain model (no parametrizations, exact zeros) when fit ends.
        seed: seed for random initializers; ``None`` uses torch's global generator.

    Raises:
        ValueError: any argument of the wrong type or out of range, at construction (a strategy object's own
            fields when it is built); an
            unsupported strategy, a target that matches nothing, NaN/Inf weights or an unbounded training length,
            in ``setup`` (or as ``configure_model`` ends, for what only the built module can tell).

    Example:
        >>> from lightning_masks import MaskOptimizer, Schedule
        >>> pruner = MaskPruningCallback(0.9, schedule=Schedule("cubic", start=1, end=0.7),
        ...                              optimizer=MaskOptimizer(lr=0.05))
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[pruner])  # doctest: +SKIP
    """

    #: the arguments that take a strategy object, and its class (the app names them in its overrides' errors)
    STRATEGIES: ClassVar[Mapping[str, type]] = _STRATEGIES

    @refuse_flat_fields(_STRATEGIES)
    def __init__(
        self,
        sparsity: Optional[float] = None,
        init: InitSpec = "magnitude",
        schedule: ScheduleSpec = "cubic",
        *,
        selector: Optional[Selector] = None,
        state: Optional[MaskState] = None,
        optimizer: Optional[MaskOptimizer] = None,
        logging: Optional[MaskLogging] = None,
        targets: Optional[Iterable[TargetSpec]] = None,
        exclude: Iterable[TargetSpec] = (),
        frozen: str = "skip",
        output_layers: Union[str, Iterable[str], None] = "auto",
        fold_on_fit_end: bool = True,
        seed: Optional[int] = None,
    ) -> None:
        target_specs = check_targets("targets", targets, optional=True)
        exclude_specs = check_targets("exclude", exclude)
        selector = instance_of("selector", selector, Selector, "Selector(granularity='channel')")
        final = final_sparsity(sparsity, selector, _DEFAULT_SPARSITY)
        check_settings(frozen=frozen, seed=seed)
        check_flags(fold_on_fit_end=fold_on_fit_end)
        refuse_misplaced("init", init, _STRATEGIES)
        refuse_misplaced("schedule", schedule, _STRATEGIES)

        self.sparsity = final
        self.initializer = get_initializer(init)
        self.schedule = get_schedule(schedule, final)
        check_relaxed_schedule(selector, self.schedule)
        check_relaxed_init(selector, self.initializer)
        warn_relaxed_gates(selector, frozen)
        self.selector = selector
        self.state = instance_of("state", state, MaskState, "MaskState(temperature=0.5)")
        self.optimizer = instance_of("optimizer", optimizer, MaskOptimizer, "MaskOptimizer(lr=0.05)")
        self.logging = instance_of("logging", logging, MaskLogging, "MaskLogging(plots=False)")
        self.targets = target_specs
        self.exclude = exclude_specs
        self.frozen = frozen
        self.output_layers = check_output_layers(output_layers)
        self.fold_on_fit_end = fold_on_fit_end
        self.seed = seed
        self._clock: Optional[float] = None  # when the last step started (after its update), for the budget
        self._total_steps = 1.0  # this fit's optimizer steps (trainer.training_length), set as training starts
        self._noise: dict[str, torch.Generator] = {}  # the relaxation's noise generators of this fit, by device
        self._noise_states: Optional[dict[str, torch.Tensor]] = None  # their checkpointed states, until they exist

        # this fit's lifecycle (plan.py)
        self.plan = Plan(self.schedule, selector.regrow)
        self.scores_initialized = False
        self._flips: dict[str, torch.Tensor] = {}
        self._gate_cache: Optional[AbstractContextManager[None]] = None  # cached_gates(), entered, while evaluating
        self._logged_step: Optional[int] = None  # step of the last scalar log, not to log a step twice
        self._shown_sparsity: Optional[float] = None  # the progress bar's masks/sparsity, logged when it moves
        self._masked: list[MaskedTensor] = []
        self._scores = ScoreOptimizers([], [])  # the scores' optimizers of this fit (optim.py)
        self._score_states: Optional[list] = None  # their checkpointed state, until they exist
        self._load_hook: Optional[RemovableHandle] = None
        self._masked_at_setup = False
        self._excluded: list = []  # what the last attach left out (exclude, and output layers kept whole)
        self._fit_running = False  # between a fit's setup and its end (on_fit_end or on_exception)
        self.final_layers: list[dict] = []  # the end-of-fit table's rows (stats.layer_rows) of the last fit

    #: The fine-pruning preset's shift of the initial scores: gates start near ``sigmoid(-3) = 0.047``.
    FINETUNING_SHIFT = -3.0

    @classmethod
    def finetuning(cls, sparsity: Optional[float] = None, init: InitSpec = "magnitude",
                   **overrides: Any) -> "MaskPruningCallback":
        """The fine-pruning preset: prune a pretrained network while it adapts to a new task.

        The defaults with two changes. ``frozen="gate"``: a backbone frozen by hand or by a ``BaseFinetuning``
        callback gets learned soft gates, scores trained from the first step. And the scores start
        :attr:`FINETUNING_SHIFT` lower (a named ``init`` gets ``shift=-3``), so that each gate starts near
        ``g0 = sigmoid(-3) = 0.047`` instead of one half. The rescale (``rescale_gate``, on) divides the gate by its
        initial value, so the network still starts as the pretrained one, but a kept weight's effective factor
        ``sigmoid(s / T) / g0`` may now grow to ``1 / g0 = 21`` rather than 2, and in the sigmoid's lower tail it
        moves as ``exp(s)``: by the same fraction per step at any size. Fine-pruning needs that room: with the
        weights frozen or at a small lr the few kept weights must grow to carry what the pruned ones did, and
        with gates starting at one half they stall at the ceiling of 2.

        Measured on the transfer benchmark (LeNet-300-100 pretrained on five Fashion-MNIST classes, fine-pruned
        on the other five under a new dense head, 8 epochs, 3 seeds; ``benchmarks/results/finepruning_lenet300_e8.md``):
        at a backbone weight lr of 1e-4, 96.22 / 95.78% at 98 / 99.5% sparsity against the defaults' 95.24 / 93.15
        and dense fine-tuning's 96.09; backbone frozen, 95.85 / 95.51 against GMP's 70.47 / 64.15 (shifts of -2 to
        -4 in ``finepruning_lenet300_study.md``). An initializer built by the caller (an
        :class:`~lightning_masks.masking.initializers.Initializer` such as ``get_initializer("magnitude", shift=0)``,
        or a callable) is used as it is, with a warning when it is unshifted. Without the rescale
        (``state=MaskState(rescale_gate=False)``) the gates would scale the network down by ``g0``, so the scores are
        not shifted then. Pass ``frozen="mask"`` to keep every kept weight of a frozen backbone bit for bit.

        Args:
            sparsity: as for the callback.
            init: as for the callback; a name is built with ``shift=FINETUNING_SHIFT``.
            overrides: any other argument of the callback.
        """
        state = overrides.get("state")
        if not (isinstance(state, MaskState) and not state.rescale_gate):  # another object: refused by __init__
            if isinstance(init, str):
                init = get_initializer(init, shift=cls.FINETUNING_SHIFT)
            elif callable(init) and not isinstance(init, tuple(_STRATEGIES.values())) and (
                    get_initializer(init).shift == 0):
                rank_zero_warn(f"lightning_masks: finetuning() uses init={init!r} as it is, unshifted: its gates "
                               "start near one half, so a kept weight may grow 2x, not 21x as under the preset's "
                               f"shift. For the preset, pass a name (init='magnitude') or build it with "
                               f"shift=MaskPruningCallback.FINETUNING_SHIFT ({cls.FINETUNING_SHIFT:g})")
        return cls(sparsity, init, **{"frozen": "gate", **overrides})

    # ----------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        self._masked_at_setup = bool(masked_tensors(pl_module))
        self._load_hook = restore_masks_on_load(pl_module)
        if stage != "fit":
            return
        self.plan = self.plan.fresh()  # each fit starts a new lifecycle; a resume loads its state after setup
        self._fit_running = True
        self._shown_sparsity = self._logged_step = None
        self._flips = {}
        self._noise = {}
        if self.schedule.uses_fractions and unbounded(trainer):
            raise ValueError(
                "the schedule's start/end are fractions of training, but training length is unbounded "
                f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}); set max_epochs or max_steps, "
                "or give the schedule int start/end"
            )
        if (self.initializer.needs_grad or self.initializer.needs_inputs) and not pl_module.automatic_optimization:
            raise ValueError(f"{self.initializer!r} scores one automatic-optimization training step; this module "
                             "uses manual optimization: pick another init")
        before = None
        if sharding.model_parallel(trainer):
            if self.initializer.needs_grad:
                raise ValueError(f"{self.initializer!r} scores one training step of the dense model, which "
                                 "ModelParallelStrategy shards only after the masks attach: pick an init computed "
                                 "from the weights (e.g. init='magnitude')")
            if self.initializer.needs_inputs:
                raise ValueError(f"{self.initializer!r} scores the weights from the dense model's inputs over "
                                 "training batches, which under ModelParallelStrategy run only once the weights "
                                 "are sharded, and its scores and input norms are not computed on shards: pick an "
                                 "init computed from the weights (e.g. init='magnitude'), or start from a one-shot "
                                 "Wanda mask with init='from_zeros'")
            before = lambda: self.mask_before_sharding(trainer, pl_module, required=False)  # noqa: E731
        after_configure_model(pl_module, lambda: self._mask(trainer, pl_module), before)

    def mask_before_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, required: bool = True
                             ) -> None:
        """Attach the masks to the unsharded module, their per-unit state held as parameters so that ``fully_shard``
        shards it with the weights (ModelParallelStrategy: called as ``configure_model`` starts, and by
        :func:`~lightning_masks.lightning.sharding.mask_before_sharding` within it, which masks the layers built
        since). Without ``required``, a module with nothing to mask yet (its layers built in ``configure_model``) is
        left for later."""
        try:
            pending = resolve_targets(pl_module, self.targets, self.exclude).chosen
        except ValueError:  # targets naming layers configure_model has yet to build
            if required:
                raise
            return
        if not pending and (masked_tensors(pl_module) or not required):
            return  # all masked already, or nothing built yet
        with frozen_by_finetuning(trainer, pl_module) as thawed:
            masked = self._attach(trainer, pl_module, thawed)
        self._refreeze(masked, thawed)
        shard_with_weights(masked)

    def _refreeze(self, masked: list[MaskedTensor], thawed: list[torch.Tensor]) -> None:
        """Freeze the scores of the tensors a ``BaseFinetuning`` froze with them (``frozen="skip"``); the other
        rules train them from the first step."""
        if self.frozen == "skip":
            refreeze(masked, thawed)

    def _mask(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the masks to the built module (after ``setup`` and ``configure_model``, before the optimizers,
        the checkpoint restore and the DDP wrapper), or adopt the ones it has; check them against the selector."""
        attached = not masked_tensors(pl_module)
        if attached and sharding.model_parallel(trainer):
            sharding.refuse_unmasked_shards(pl_module)
        elif sharding.model_parallel(trainer):
            sharding.warn_built_after_masking(pl_module, self.targets, self._excluded)
        groups = coupled_norms(pl_module) if self.selector.auto_tie else None
        with frozen_by_finetuning(trainer, pl_module) as thawed:  # a BaseFinetuning's frozen tensors are masked too
            self._masked = self._attach(trainer, pl_module, thawed) if attached else masked_tensors(pl_module)
        self._refreeze(self._masked, thawed)
        relaxation, grain = cast(Optional[GumbelPatterns], self.selector.relaxation), self.selector.grain  # as built
        for entry in self._masked:
            entry.gate.straight_through = self.selector.straight_through
            if relaxation is not None and grain.n is not None and grain.m is not None:
                entry.gate.relaxation = RelaxedGroups(relaxation, grain.n, grain.m, entry.unit_axis,
                                                      self._noise_generator(entry.weight.device))
            if self.initializer.fixed:  # a held mask: the scores do not learn
                entry.gate.scores.requires_grad_(False)
        try:
            if groups is not None:
                tie = ties_among(groups, [entry.name for entry in self._masked])
                self.selector = dataclasses.replace(self.selector, tie=tie)
                rank_zero_info(f"lightning_masks: tie='auto' ties {len(tie)} groups: {tie}")
                if not tie:
                    rank_zero_warn("lightning_masks: tie='auto' tied nothing: it ties masked BatchNorms whose channels "
                                   "meet in a sum, and none is masked; add them to targets (e.g. targets=[nn.Linear, "
                                   "nn.Conv2d, nn.BatchNorm2d]) or drop tie='auto'")
            self.selector.check(self._masked)
            if is_sharded(self._masked):
                sharding.check_shard_layout(self._masked, self.selector)
        except ValueError:
            if attached:
                detach(pl_module)
            raise
        mask_copies(trainer, pl_module)  # e.g. StochasticWeightAveraging's copy, made in its setup before ours
        # configure_optimizers groups what it sees by name and type (minGPT): show it the plain model
        within_configure_optimizers(pl_module, lambda: masks_hidden(pl_module))
        plain_saves(pl_module)  # a save_pretrained snapshot during fit saves the masked weights under plain keys

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        """This fit's generator of the relaxation's noise on ``device`` (seeded by ``seed``, else by torch's initial
        seed: ``seed_everything`` repeats it); its state is in the callback's checkpoints."""
        key = str(device)
        if key not in self._noise:
            seed = self.seed if self.seed is not None else torch.initial_seed()
            self._noise[key] = torch.Generator(device=device).manual_seed(seed)
        return self._noise[key]

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                thawed: list[torch.Tensor]) -> list[MaskedTensor]:
        """Mask the targets; with ``frozen="mask"`` or ``"gate"``, those frozen at setup too (by hand, or ``thawed``
        here from a finetuning callback's freezing), binary masks for ``"mask"``."""
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        from_batches = self.initializer.needs_grad or self.initializer.needs_inputs
        init = torch.zeros_like if from_batches else (lambda weight: self.initializer(weight, generator=generator))
        exclude = self._excluded = self.exclude + self._outputs_kept_whole(trainer, pl_module)
        resolved = resolve_targets(pl_module, self.targets, exclude, mask_frozen=self.frozen != "skip")
        if self.frozen != "skip":
            ids = {id(p) for p in thawed}
            resolved.frozen_chosen += [name for name, owners in resolved.chosen.items()
                                       if id(getattr(*owners[0])) in ids]
        # FSDP2 gathers a module's trainable parameters in one dtype: the scores take their weight's
        state = self.state
        score_dtype = None if sharding.model_parallel(trainer) else cast(Optional[torch.dtype], state.score_dtype)
        relaxed = list(resolved.chosen) if self.selector.relaxation is not None else []  # binary outside training
        masked = attach(pl_module, self.targets, resolved=resolved, init=init, temperature=state.temperature,
                        rescale=state.rescale_gate, per_channel=self.selector.grain.channel,
                        score_dtype=score_dtype, compact=state.compact, frozen=self.frozen, binary=relaxed)
        self.scores_initialized = not from_batches
        self._start_from_initial_keep(masked)
        if self.scores_initialized:
            self._scores_ready(masked)
        goal = (f"gate threshold up to {self.schedule.final}" if self.schedule.by_threshold
                else f"final sparsity {self.sparsity}")
        fit_report.announce(masked, resolved, exclude[len(self.exclude):], f"init={self.initializer!r}, {goal}")
        warn_inner_copies(pl_module, masked)
        return masked

    def _start_from_initial_keep(self, masked: list[MaskedTensor]) -> None:
        """Prune what the initializer's :meth:`~lightning_masks.masking.initializers.Initializer.initial_keep` drops
        (e.g. a one-shot pruner's zeros); a ``fixed`` initializer's mask is held by skipping every update."""
        held = 0
        for entry in masked:
            keep = self.initializer.initial_keep(entry.weight.detach())
            if keep is not None:
                keep = reduce_to(keep.float(), entry.gate.scores.shape) > 0  # a channel stays while any entry does
                entry.gate.set_keep(keep)
                entry.gate.reset_scores(entry.gate.scores.detach().clone())  # the rescale over the kept entries
                held += int((~keep).sum())
        if self.initializer.fixed:
            self.plan.pruned = held

    def _scores_ready(self, masked: list[MaskedTensor]) -> None:
        """The initial scores are set: under a relaxation, standardise them per tensor, so that the pattern logits'
        scale (``GumbelPatterns.scale``) means the same for every layer and initializer."""
        if self.selector.relaxation is None:
            return
        flat = []
        for entry in masked:
            norm = entry.gate.input_norm  # activation-aware (Wanda): the prior is |w| * rms(x_j)
            scores = entry.gate.scores.detach().float()  # standardised in float32, whatever the scores' dtype
            scores = standardized(scores if norm is None else scores * norm)
            if entry.numel > 1 and not scores.any():  # all equal: every pattern as likely as the others
                flat.append(entry.name)
            entry.gate.reset_scores(scores)
        if flat:
            rank_zero_warn(f"lightning_masks: init={self.initializer!r} gives {len(flat)} masked tensors equal "
                           f"scores ({', '.join(flat[:4])}{', ...' if len(flat) > 4 else ''}): the relaxation starts "
                           "them with no preferred pattern (each group's patterns equally likely, ties that a "
                           "selection before the scores learn breaks by position); pick an init that ranks the "
                           "weights, e.g. init='magnitude' or 'wanda'")

    def _outputs_kept_whole(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """With channel masks, the layers whose output units are the model's outputs (see ``output_layers``)."""
        if not self.selector.grain.channel or not self.output_layers:
            return []
        run = one_pass(trainer, pl_module) if self.output_layers == "auto" else None
        found = kept_whole(pl_module, self.targets, self.output_layers, run)
        if found is None:
            rank_zero_warn("lightning_masks: granularity='channel' could not find the layers that produce the model's "
                           "outputs (they are kept whole, so no class or token loses its logit): set "
                           "pl_module.example_input_array, or name them with output_layers=[...] (None prunes them)")
        return found or []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mask_copies(trainer, pl_module)  # copies made by other callbacks before the masks existed
        lr, weight_decay = self.optimizer.lr, self.optimizer.weight_decay
        if sharding.model_parallel(trainer) and self.optimizer.own_settings:
            # a copy's state would be neither sharded nor in the distributed checkpoint: yours trains them
            rank_zero_warn("lightning_masks: under ModelParallelStrategy your optimizer trains the mask scores in "
                           f"the param groups of their weights ({self.optimizer!r}: lr and weight_decay are not "
                           "applied); pass optimizer=MaskOptimizer(lr=None, weight_decay=None) to silence this")
            lr = weight_decay = None
        self._scores = ScoreOptimizers(trainer.optimizers, self._masked, lr, weight_decay,
                                       fuse=self.optimizer.fused_adam, clip_val=trainer.gradient_clip_val,
                                       clip_algorithm=trainer.gradient_clip_algorithm)
        if self._score_states is not None:  # a resume loaded the callback's state before the optimizers existed
            self._scores.load_state_dict(self._score_states)
            self._score_states = None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._scores.stash(optimizer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.scores_initialized:
            # the calibration batches draw from the global RNG (a shuffled loader's order, dropout): restored after,
            # so that the fit trains on the same data in the same order whatever the initializer
            with isolate_rng():
                if self.initializer.needs_inputs:
                    self._score_from_inputs(trainer, pl_module)
                else:
                    self._score_from_one_batch(trainer, pl_module)
        self._total_steps, per_epoch = training_length(trainer)
        for key, state in (self._noise_states or {}).items():  # a resume: the noise goes on as it would have
            if key in self._noise:
                self._noise[key].set_state(state)
        self._noise_states = None
        if not math.isfinite(per_epoch):
            raise ValueError("the training dataloader has no length (a stream) and max_steps is unset, so the fit's "
                             "steps are unknown and the schedule cannot be placed on them: set max_steps")
        if self.selector.relaxation is not None and not math.isfinite(self._total_steps):
            raise ValueError(f"relaxation={self.selector.relaxation!r} anneals its temperature over the fit's "
                             "steps, but this fit has no bound on them (max_epochs=-1 and max_steps=-1): set "
                             "max_steps (or max_epochs)")
        self.plan.resolve(self._total_steps, per_epoch)

    def _score_from_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialise activation-aware scores (e.g. Wanda) from the input norms of the dense network, in eval mode,
        over the first training batches (summed over data-parallel ranks, so every rank gets the same scores)."""
        training = pl_module.training
        pl_module.eval()
        try:
            with gates_disabled(self._masked), torch.no_grad(), input_norms(self._masked) as norms:
                for batch in training_batches(trainer, self.initializer.batches):
                    training_loss(pl_module, trainer.strategy.batch_to_device(batch))
        finally:
            pl_module.train(training)
        for entry in self._masked:
            norms.squares[entry.name] = trainer.strategy.reduce(norms.squares[entry.name], reduce_op="sum")
            norms.rows[entry.name] = trainer.strategy.reduce(norms.rows[entry.name], reduce_op="sum")
            norm = norms.rms(entry.name)
            entry.gate.reset_scores(self.initializer(entry.weight.detach(), input_norm=norm))
            entry.gate.set_input_norm(norm)  # selection ranks |w * gate| * ||x||: Wanda's criterion, kept all fit
        self._scores_ready(self._masked)
        self.scores_initialized = True

    def _score_from_one_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialise gradient-based scores (e.g. SNIP) from one training batch of the dense network."""
        batch = trainer.strategy.batch_to_device(first_batch(trainer))
        weights = [entry.weight for entry in self._masked]
        frozen = [weight for weight in weights if not weight.requires_grad]  # frozen="mask"/"gate": scored all the same
        for weight in frozen:
            weight.requires_grad_(True)
        try:
            with gates_disabled(self._masked), torch.enable_grad():
                grads = torch.autograd.grad(training_loss(pl_module, batch), weights, allow_unused=True)
        finally:
            for weight in frozen:
                weight.requires_grad_(False)
        for entry, grad in zip(self._masked, grads):
            grad = torch.zeros_like(entry.weight) if grad is None else grad
            entry.gate.reset_scores(self.initializer(entry.weight.detach(), grad=grad))
        self._scores_ready(self._masked)
        self.scores_initialized = True

    # ----------------------------------------------------------------------------------------- updates
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock = None  # the budget times steps within an epoch (not the validation between)
        self._update(trainer, self.plan.due(trainer.current_epoch, step_clock(trainer), epoch_start=True))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        started = time.perf_counter()
        self._anneal(trainer)
        updated = self._update(trainer, self.plan.due(trainer.current_epoch, step_clock(trainer), epoch_start=False))
        if self.plan.budgeted:
            self._account(trainer, started, updated)

    def _anneal(self, trainer: pl.Trainer) -> None:
        """Under a relaxation, set the Gumbel-softmax temperature for this step (linear over the fit's optimizer steps,
        counted as the schedule counts them: :func:`~lightning_masks.lightning.trainer.step_clock`)."""
        relaxation = cast(Optional[GumbelPatterns], self.selector.relaxation)  # a Selector builds its GumbelPatterns
        if relaxation is not None:
            tau = relaxation.tau(step_clock(trainer) / max(self._total_steps, 1.0))
            for entry in self._masked:
                if entry.gate.relaxation is not None:
                    entry.gate.relaxation.tau = tau

    def _account(self, trainer: pl.Trainer, started: float, updated: bool) -> None:
        """The update budget: time the step just ended and the update just made; after an update or as the step
        estimate settles, set the interval so that updates keep to their share (rank zero's decision, broadcast, so
        every rank updates alike)."""
        now = time.perf_counter()
        step = None if self._clock is None else (started - self._clock) * trainer.accumulate_grad_batches
        self._clock = now
        if self.plan.account(step, now - started if updated else None):
            at = step_clock(trainer)
            self.plan.widen(at, trainer.strategy.broadcast(self.plan.wanted_interval(at)))

    def _update(self, trainer: pl.Trainer, t: Optional[int]) -> bool:
        """Make the update due at ``t`` (if any); return whether a selection ran."""
        if t is None:  # nothing due
            return False
        target = None if self.initializer.fixed else self.plan.decide(t)
        if target is not None:
            self._select(trainer, t, target)
        return target is not None

    def _select(self, trainer: pl.Trainer, t: float, target: float) -> None:
        """Set the keep-masks to ``target`` (a sparsity, or a gate threshold) and record the update at ``t``."""
        select = self.selector.threshold if self.plan.by_threshold else self.selector
        self._reshard(trainer)
        with sharding.counting(trainer, self._masked):  # over every process's shards under FSDP2
            pruned, threshold, self._flips = select(local_entries(self._masked), target)
        rows = sharding.layer_rows(self._masked)
        self.plan.record(t, target, pruned, threshold, [row["name"] for row in rows], [row["sparsity"] for row in rows])
        mask_copies(trainer, trainer.lightning_module)

    def _reshard(self, trainer: pl.Trainer) -> None:
        """Under FSDP2, read the masks from the shards (a forward without backward leaves the root's gathered)."""
        if sharding.model_parallel(trainer):
            sharding.reshard(trainer.lightning_module)

    @property
    def score_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers that train the scores in this fit (copies of yours at ``optimizer.lr``), one for each of
        your optimizers whose param groups hold scores; empty outside a fit, or when yours train them
        (``MaskOptimizer(lr=None, weight_decay=None)``)."""
        return self._scores.optimizers

    # ----------------------------------------------------------------------------------------- logging
    @property
    def sparsity_now(self) -> float:
        """The global sparsity, in masked units, after the last update (host value, no sync)."""
        total = sum(entry.units for entry in self._masked)
        return self.plan.pruned / total if total else 0.0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sparsity = self.sparsity_now
        if batch_idx == 0 or sparsity != self._shown_sparsity:  # a log call can cost ~ms: only when it moves
            pl_module.log("masks/sparsity", sparsity, prog_bar=True, logger=False, on_step=True, on_epoch=False)
            self._shown_sparsity = sparsity
        every = (trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by a connector, not declared on Trainer
                 if self.logging.every_n_steps is None else self.logging.every_n_steps)
        if every and trainer.global_step % every == 0:
            self._log_stats(trainer, histograms=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_stats(trainer, histograms=self.logging.histograms)

    def _log_stats(self, trainer: pl.Trainer, histograms: bool) -> None:
        # Sharded masks are counted by every process (collective calls); rank zero logs.
        sharded = sharding.model_parallel(trainer)
        if not (trainer.loggers and (trainer.is_global_zero or sharded) and self._masked):
            return
        self._reshard(trainer)
        if self._logged_step != trainer.global_step:
            self._logged_step = trainer.global_step
            fit_report.log_scalars(trainer, self._masked, self._flips, self.plan.target, self.plan.threshold,
                                   statistics=sharding.mask_stats)
        if histograms:
            values = sharding.histograms(self._masked) if sharded else fit_report.histograms(self._masked)
            if trainer.is_global_zero:
                loggers.log_histograms(trainer.loggers, values, trainer.global_step)

    # ----------------------------------------------------------------------------------------- evaluation
    def _cache_gates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute each masked weight once per evaluation loop instead of once per batch (not when sharded: the
        cache would hold every layer's whole weight at once, which FSDP2 gathers one layer at a time)."""
        if self._gate_cache is None and not sharding.model_parallel(trainer):
            self._gate_cache = cached_gates()
            self._gate_cache.__enter__()

    def _drop_gate_cache(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._gate_cache is not None:
            cache, self._gate_cache = self._gate_cache, None
            cache.__exit__(None, None, None)

    on_validation_start = on_test_start = on_predict_start = override(_cache_gates)
    on_validation_end = on_test_end = on_predict_end = override(_drop_gate_cache)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fit_running = False
        restore_configure_model(pl_module)
        restore_configure_optimizers(pl_module)
        self._scores.remove()
        self._drop_gate_cache(trainer, pl_module)
        if self._masked and not self._masked_at_setup and self.plan.position is None:
            detach(pl_module)  # failed before any mask update: give the user back the plain model
            self._masked = []
        elif self._masked and self.plan.position is not None:
            self._reshard(trainer)
            self._end_short(trainer, jump=False)  # warn with what was reached
            if self.fold_on_fit_end:
                self._fold(pl_module)

    # ----------------------------------------------------------------------------------------- the end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reshard(trainer)
        self._fit_running = False
        if self._masked:
            self._end_short(trainer, jump=True)
            if self.selector.relaxation is not None and self.plan.position is not None:
                # the most probable patterns of the last scores, not those of the last update
                self._select(trainer, self.plan.position, self.sparsity)
            self.final_layers = sharding.layer_rows(self._masked)
            plots = self.logging.plots
            gates = sharding.gate_histograms(self._masked) if plots and sharding.model_parallel(trainer) else None
            fit_report.report_fit(trainer, self.final_layers, self._masked, self.plan.history, self.plan.cadence,
                                  plots, gates=gates)
        if self.fold_on_fit_end:
            self._fold(pl_module)

    def _fold(self, pl_module: pl.LightningModule) -> None:
        """Fold the masks into plain weights (sharded ones shard by shard, FSDP2 then gathering the plain weights)."""
        folded = masked_tensors(pl_module)
        fold(pl_module)
        if is_sharded(folded):
            sharding.repoint_folded(pl_module, folded)
        self._masked = []

    def _end_short(self, trainer: pl.Trainer, jump: bool) -> None:
        """A fit that ended before its ramp: one last update to the final target (``early_end="final"``), or warn."""
        shortfall = None if self.initializer.fixed else self.plan.shortfall()
        if shortfall is None:
            return
        final = self.plan.end_target() if jump else None
        if final is not None:
            reached = self.sparsity_now
            self._select(trainer, self.plan.position if self.plan.position is not None else step_clock(trainer), final)
            rank_zero_info(shortfall.message(reached, f"early_end='final' made the last update to the final target "
                                                      f"({self.sparsity_now:.2%} now)"))
            return
        action = ("the model is folded as it is" if self.fold_on_fit_end else "the masks stay as they are") + \
            ("; pass early_end='final' in the schedule (e.g. Schedule('cubic', early_end='final')) to jump to the "
             "final target when a fit ends early" if jump else "")
        rank_zero_warn(shortfall.message(self.sparsity_now, action))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        restore_configure_model(pl_module)
        restore_configure_optimizers(pl_module)
        if stage == "fit":
            self._scores.remove()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        if stage != "fit" and self.fold_on_fit_end and not self._masked_at_setup:
            fold(pl_module)  # masks restored from a checkpoint for this evaluation only
        if stage == "fit" and self._fit_running:
            # A tuner's fit (Tuner.lr_find, scale_batch_size) ends here, with neither on_fit_end nor on_exception,
            # once it has restored the model's state from before its trial steps: give the weights back as they were.
            self._fit_running = False
            if not self._masked_at_setup:
                detach(pl_module)
                self._masked = []
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):  # a worker of ddp_spawn (or fork)
            if stage == "fit" and self._masked:
                # The main process loads this state dict into its plain model, non-strictly: masked keys would be
                # dropped. Folded, it gets the trained function with its exact zeros (the worker's model ends here).
                fold(pl_module)
                self._masked = []
        if not masked_tensors(pl_module):
            remove_plain_saves(pl_module)
        end_process_group_at_exit()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.plan.state_dict(), "scores_initialized": self.scores_initialized,
                "score_optimizers": self._scores.state_dict(),
                "relaxation_noise": {key: generator.get_state() for key, generator in self._noise.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan.load_state_dict(state_dict)
        self.scores_initialized = state_dict["scores_initialized"]
        self._noise_states = state_dict.get("relaxation_noise") or None
        states = state_dict.get("score_optimizers") or None
        if states is not None and self._scores.optimizers:
            self._scores.load_state_dict(states)
        else:
            self._score_states = states


