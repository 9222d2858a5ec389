"""Train the mask scores beside the user's optimizers without changing what their schedulers and code see."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from .._checks import check_flags, check_number
from ..masking import MaskedTensor

__all__ = ["MaskOptimizer", "ScoreOptimizers"]

_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")  # how a group steps, not what it computes
_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # the fused CPU kernel computes bfloat16 in float32


@dataclass(frozen=True)
class MaskOptimizer:
    """How the mask scores train: their learning rate and weight decay, and the fused Adam kernel.

    ``configure_optimizers`` runs on the plain model (the masks hidden: your param groups hold ``fc.weight``, not the
    scores); the scores then ride in the param group of their weight, and a copy of that optimizer steps them at these
    settings whenever yours steps (:class:`ScoreOptimizers`): your LR schedulers schedule your groups only.

    Args:
        lr: the scores' learning rate (default 0.01); ``None``: their weight's group's, at each step.
        weight_decay: the scores' weight decay; ``None`` (the default): their weight's group's. Both ``None``: your
            optimizer trains them.
        fused_adam: switch the CPU ``Adam``/``AdamW`` param groups that train scores or masked weights, and whose
            ``foreach``/``fused`` you left unset, to torch's fused kernel (``fused=True``): the same update up to
            float rounding, several times faster on the exactly-zero gradients of pruned entries. ``False`` leaves
            your optimizer's groups as they are.

    Raises:
        ValueError: ``lr`` or ``weight_decay`` not a number >= 0 or ``None``, ``fused_adam`` not a bool.

    Example:
        >>> MaskOptimizer(lr=0.0)  # the scores stay as initialised: gradual magnitude pruning
        MaskOptimizer(lr=0.0, weight_decay=None, fused_adam=True)
    """

    lr: Optional[float] = 1e-2
    weight_decay: Optional[float] = None
    fused_adam: bool = True

    def __post_init__(self) -> None:
        for name, value in (("lr", self.lr), ("weight_decay", self.weight_decay)):
            check_number(name, value, 0.0, math.inf, optional=True,
                         hint=f"e.g. MaskOptimizer({name}=0.01) (a float, not a string)")
        check_flags(fused_adam=self.fused_adam)

    @property
    def own_settings(self) -> bool:
        """Whether the scores train at settings of their own (a copy of your optimizer steps them)."""
        return (self.lr, self.weight_decay) != (None, None)


class ScoreOptimizers:
    """The scores ride in the param group of their weight; with ``lr`` or ``weight_decay`` set, a twin steps them.

    Each score joins the param group that trains its weight (else the first group of the first optimizer) as an
    extra tensor: no group is added, so every LR scheduler built in ``configure_optimizers`` keeps working, and the
    user's ``zero_grad``, ``toggle_optimizer``, AMP unscaling and skipped steps reach the scores as they reach the
    weights. With ``lr`` and ``weight_decay`` both ``None`` the user's optimizer trains them like its own tensors.
    Otherwise a twin of the user's optimizer (its class, built from the group's hyperparameters, with ``lr`` and
    ``weight_decay`` where set) trains them: :meth:`stash` takes their gradients away before the user's step, so it
    leaves them alone, and the step's post-hook hands them back and steps the twin. A step that AMP's scaler skips
    never reaches the hook, so the twin skips it too. The twin follows the group's other hyperparameters (betas,
    momentum, and ``lr`` when ``lr`` is ``None``) at every step, clips the scores' gradients by their own norm with
    the Trainer's ``gradient_clip_val``, and its state is :meth:`state_dict`.

    Args:
        optimizers: the fit's optimizers (``trainer.optimizers``).
        masked: the masked tensors.
        lr, weight_decay: the scores' learning rate and weight decay; ``None``: their weight's group's.
        fuse: run CPU ``Adam``/``AdamW`` groups that hold scores or masked weights, and left the implementation to
            torch (``foreach=None, fused=None``), and the twin's, on torch's fused kernel: the same update up to
            float rounding. A pruned entry's gradient is exactly zero, in the scores and the weight alike, and the
            per-tensor loop's ``sqrt`` and division of the zero (later denormal) state take a slow path on some
            CPUs: the loop made a Lightning fit of a 90%-sparse LeNet-300-100 1.43x the dense fit, the fused kernel
            1.04-1.11x (``benchmarks/README.md``). Groups with optimizer state already, or holding a tensor that is
            not a float32/float64/bfloat16 CPU one, are left as they are.
        clip_val, clip_algorithm: the Trainer's ``gradient_clip_val`` and ``gradient_clip_algorithm`` (``"norm"``
            or ``"value"``; ``None``, the Trainer's default, is ``"norm"``), applied to the scores' gradients before
            the twin steps.

    Raises:
        ValueError: the twin cannot be built from the user's optimizer (its class's constructor does not take its
            ``defaults``); the message names it and the way out (``MaskOptimizer(lr=None, weight_decay=None)``).
    """

    def __init__(self, optimizers: Sequence[Optimizer], masked: Sequence[MaskedTensor], lr: Optional[float] = None,
                 weight_decay: Optional[float] = None, *, fuse: bool = True, clip_val: Optional[float] = None,
                 clip_algorithm: Optional[str] = "norm") -> None:
        self.lr, self.weight_decay = lr, weight_decay
        self.clip_val, self.clip_algorithm = clip_val, clip_algorithm
        # id(user optimizer) -> (twin, [(index of the user's group, its scores)]): groups by index, since an
        # optimizer's load_state_dict (a resume) replaces its group dicts
        self._twins: dict[int, tuple[Optimizer, list[tuple[int, list[torch.Tensor]]]]] = {}
        self._pending: dict[int, list[Optional[torch.Tensor]]] = {}  # stashed gradients, by id(user optimizer)
        self._hooks: list[Any] = []
        self._riders: list[tuple[Optimizer, int, list[torch.Tensor]]] = []
        self._warned = False
        if not optimizers or not masked or not optimizers[0].param_groups:
            return
        rides = _ride(optimizers, masked)
        self._riders = rides
        if fuse:
            _fuse_groups(optimizers, {id(t) for entry in masked for t in (entry.gate.scores, entry.weight)})
        if lr is None and weight_decay is None:
            return
        for optimizer in optimizers:
            groups = [(index, scores) for owner, index, scores in rides if owner is optimizer]
            if groups:
                self._twins[id(optimizer)] = (self._twin(optimizer, groups, fuse), groups)
                self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    @property
    def optimizers(self) -> list[Optimizer]:
        """The twins, one for each user optimizer whose groups hold scores (none when the user's optimizers train
        them)."""
        return [twin for twin, _ in self._twins.values()]

    def _twin(self, optimizer: Optimizer, groups: list[tuple[int, list[torch.Tensor]]], fuse: bool) -> Optimizer:
        cls = type(optimizer)
        twin_groups = [{"params": scores, **self._hyper(optimizer, optimizer.param_groups[index])}
                       for index, scores in groups]
        try:
            if _needs_closure(cls):  # stepped by the hook, which has no closure to give
                raise TypeError(f"{cls.__name__}.step needs a closure")
            twin = cls(twin_groups, **_constructor_args(cls, optimizer.defaults))
        except Exception as error:
            raise ValueError(
                f"lightning_masks trains the mask scores with a copy of your optimizer ({cls.__name__}) at lr="
                f"{self.lr}, weight_decay={self.weight_decay}, and could not build one from its defaults: "
                f"{error}. Pass optimizer=MaskOptimizer(lr=None, weight_decay=None) to train the scores in your "
                "optimizer's param group of their weight instead") from error
        if fuse:
            _fuse_groups([twin], {id(s) for _, scores in groups for s in scores})
        return twin

    def _hyper(self, optimizer: Optimizer, group: dict) -> dict:
        """The twin group's hyperparameters: the user group's, with the scores' own ``lr``/``weight_decay``."""
        hyper = {key: group[key] for key in optimizer.defaults if key in group}
        if self.lr is not None:
            hyper["lr"] = self.lr
        if self.weight_decay is not None:
            hyper["weight_decay"] = self.weight_decay
        return hyper

    def stash(self, optimizer: Optimizer) -> None:
        """Take the gradients of the scores that ``optimizer``'s twin trains, before ``optimizer`` steps (the
        Lightning hook ``on_before_optimizer_step``: after AMP's unscaling, before gradient clipping)."""
        found = self._twins.get(id(optimizer))
        if found is None:
            return
        scores = [s for _, group_scores in found[1] for s in group_scores]
        self._pending[id(optimizer)] = [s.grad for s in scores]
        for s in scores:
            s.grad = None

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        twin, groups = self._twins[id(optimizer)]
        scores = [s for _, group_scores in groups for s in group_scores]
        grads = self._pending.pop(id(optimizer), None)
        if grads is None:
            if any(s.grad is not None for s in scores) and not self._warned:
                self._warned = True
                rank_zero_warn(f"lightning_masks: {type(optimizer).__name__} stepped outside Lightning's "
                               "optimizer_step (a raw optimizer in manual optimization?), so it trained the mask "
                               "scores with its own lr; step it through self.optimizers() to train them at the "
                               "MaskOptimizer's lr")
            return
        for s, grad in zip(scores, grads):
            s.grad = grad
        live = [s for s in scores if s.grad is not None]
        if not live or not self._unscaled(optimizer, live):
            return
        if self.clip_val:
            if self.clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(live, self.clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(live, self.clip_val)
        for target, (index, _) in zip(twin.param_groups, groups):
            source = optimizer.param_groups[index]
            for key in optimizer.defaults:
                if key in source and key not in _IMPLEMENTATION and not self._own(key):
                    target[key] = source[key]
        twin.step()

    def _own(self, key: str) -> bool:
        return (key == "lr" and self.lr is not None) or (key == "weight_decay" and self.weight_decay is not None)

    @staticmethod
    def _unscaled(optimizer: Optimizer, scores: list[torch.Tensor]) -> bool:
        """Unscale the scores' gradients where the user's optimizer unscales its own inside its step (AMP's scaler
        with a fused optimizer sets ``grad_scale``/``found_inf`` on it for the step); return whether to step."""
        scale = getattr(optimizer, "grad_scale", None)
        if scale is None:
            return True
        found = getattr(optimizer, "found_inf", None)
        if found is not None and float(found) > 0:
            return False
        grads = [s.grad for s in scores if s.grad is not None]  # all of them: only live scores are passed
        for grad in grads:
            grad.div_(scale.to(grad.dtype))
        return all(math.isfinite(float(grad.abs().max())) for grad in grads)

    def remove(self) -> None:
        """Remove the step hooks and take the scores out of the user's param groups."""
        for hook in self._hooks:
            hook.remove()
        for optimizer, index, scores in self._riders:
            ids = {id(s) for s in scores}
            group = optimizer.param_groups[index]
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        self._hooks, self._riders, self._twins, self._pending = [], [], {}, {}

    def state_dict(self) -> list[dict]:
        return [twin.state_dict() for twin in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        twins = self.optimizers
        if len(states) != len(twins):
            raise ValueError(f"the checkpoint holds {len(states)} mask-score optimizer states, this fit has "
                             f"{len(twins)} (the MaskOptimizer or the optimizers changed?)")
        for twin, state in zip(twins, states):
            twin.load_state_dict(state)


def _needs_closure(cls: type[Optimizer]) -> bool:
    closure = inspect.signature(cls.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def _constructor_args(cls: type[Optimizer], defaults: dict) -> dict:
    """The entries of an optimizer's ``defaults`` that its constructor takes (AdamW keeps a
    ``decoupled_weight_decay`` it does not take; the param groups carry every entry anyway)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(defaults)
    return {key: value for key, value in defaults.items() if key in parameters}


def _ride(optimizers: Sequence[Optimizer], masked: Sequence[MaskedTensor]) -> list[tuple[Optimizer, int, list]]:
    """Put each score in the group holding its weight (else the first group of the first optimizer), unless a group
    holds it already; return ``(optimizer, group index, scores)`` for every group holding scores, in order."""
    where: dict[int, tuple[Optimizer, int]] = {}
    for optimizer in optimizers:
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                where.setdefault(id(param), (optimizer, index))
    rides: dict[tuple[int, int], tuple[Optimizer, int, list]] = {}
    for entry in masked:
        scores = entry.gate.scores
        found = where.get(id(scores))
        optimizer, index = found or where.get(id(entry.weight)) or (optimizers[0], 0)
        if found is None:
            optimizer.param_groups[index]["params"].append(scores)
        rides.setdefault((id(optimizer), index), (optimizer, index, []))[2].append(scores)
    return list(rides.values())


def _fuse_groups(optimizers: Sequence[Optimizer], masked: set[int]) -> None:
    """Switch the CPU Adam/AdamW groups holding scores or masked weights (ids in ``masked``) to ``fused=True``
    where that is safe (see :class:`ScoreOptimizers`)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        if "cpu" not in _get_fused_kernels_supported_devices():
            return
    except (ImportError, AttributeError):
        return
    for optimizer in optimizers:
        if type(optimizer) not in _FUSABLE:
            continue
        for group in optimizer.param_groups:
            params = group["params"]
            if not any(id(p) in masked for p in params):
                continue
            if group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable") \
                    or group.get("capturable"):
                continue
            if all(p.device.type == "cpu" and p.dtype in _FUSED_DTYPES and not p.is_sparse
                   and not optimizer.state.get(p) for p in params):
                group["fused"] = True
