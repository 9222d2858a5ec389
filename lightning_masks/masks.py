"""Learnable weight masks as a parametrization: ``w -> w * sigmoid(scores / T) * keep``.

This module knows nothing of Lightning: :func:`attach` and :func:`fold` work on any ``nn.Module``. Which
tensors are weights, and which of their axes holds output units, comes from :mod:`lightning_masks.kinds`.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .kinds import bias_name, channel_shape, kind_of, output_axis

__all__ = [
    "ChannelBias",
    "MaskGate",
    "MaskedTensor",
    "TargetSpec",
    "Targets",
    "attach",
    "cached_gates",
    "channel_shape",
    "detach",
    "find_targets",
    "fold",
    "follow_masks",
    "gate_value",
    "gates_disabled",
    "keep_bits_cached",
    "masked_tensors",
    "masked_value",
    "mask_like",
    "resolve_targets",
    "restore_masks_on_load",
    "split_mask_key",
    "straight_through_gated",
]

#: A target: a glob on fully-qualified module or tensor names, or a module type.
TargetSpec = Union[str, type]

PARAMETRIZATION_MARK = ".parametrizations."


def split_mask_key(key: str) -> tuple[str, str] | None:
    """Split a parametrized state-dict key into ``(tensor, field)``, or ``None`` for any other key.

    ``"net.0.parametrizations.weight.0.scores"`` gives ``("net.0.weight", "0.scores")``.
    """
    path, mark, rest = ("." + key).partition(PARAMETRIZATION_MARK)  # the dot also finds a root module's keys
    if not mark:
        return None
    tensor_name, _, field = rest.partition(".")
    return (f"{path[1:]}.{tensor_name}" if path else tensor_name), field


#: The score of a pruned entry when the keep bits live in the scores (``MaskGate(compact=True)``): its gate
#: ``sigmoid(score / T)`` is exactly 0 for any ``T < 2^100``, in float32, bfloat16 and float64 alike.
PRUNED_SCORE = -(2.0 ** 126)
#: A score at or below this is pruned: the sentinel after any multiplicative weight decay the optimizer applies to
#: it (a factor ``1 - lr * wd`` a step keeps it below for ``ln(2^62) / (lr * wd)`` steps, 430k at ``lr * wd = 1e-4``;
#: each mask update writes the sentinel afresh). Learned scores stay many orders of magnitude above it.
PRUNED_BELOW = -(2.0 ** 64)
#: Dtypes the scores may be kept in (``None``: the weight's). float16 is left out: its range holds neither the
#: sentinel nor the scores' small gradients.
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _compute_dtype(scores: Tensor, weight: Tensor | None = None) -> torch.dtype:
    """The dtype the gate is computed in: the scores', but bfloat16 scores are widened to the weight's dtype (to
    float32 without a weight), so that low-precision scores change neither the weight's dtype nor its precision."""
    if scores.dtype not in (torch.bfloat16, torch.float16):
        return scores.dtype
    return torch.promote_types(scores.dtype, torch.float32 if weight is None else weight.dtype)


def derived_keep(scores: Tensor) -> Tensor:
    """The keep bits held in ``scores`` (``compact`` gates): ``scores > PRUNED_BELOW``, a bool tensor of their shape."""
    return scores.detach() > PRUNED_BELOW


def gate_value(scores: Tensor, temperature: Tensor | float, gate_scale: Tensor | None = None) -> Tensor:
    """Return the soft gate ``sigmoid(scores / T)``, times ``gate_scale`` when one is set.

    Computed in float32 at least (bfloat16 scores are widened first); a pruned ``compact`` score gives exactly 0.
    """
    gate = torch.sigmoid(scores.to(_compute_dtype(scores)) / temperature)
    return gate if gate_scale is None else gate * gate_scale


def masked_value(
    weight: Tensor, scores: Tensor, keep: Tensor | None, temperature: Tensor | float, gate_scale: Tensor | None = None
) -> Tensor:
    """Return ``weight * gate * keep`` with pruned entries exactly zero (the fold formula).

    ``keep=None`` reads the keep bits from the scores (:func:`derived_keep`). The products are taken in the
    order the live gate takes them, so the folded weight equals the masked one bit for bit.
    """
    raw = torch.sigmoid(scores.to(_compute_dtype(scores, weight)) / temperature)
    value = _times(weight, raw, gate_scale)
    keep = derived_keep(scores) if keep is None else keep
    return torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))


def _divisor(temperature: Tensor | float) -> Tensor | float | None:
    """``T``, or ``None`` where it is known to be exactly 1 without a device sync (the division is skipped)."""
    if isinstance(temperature, Tensor):
        if temperature.device.type != "cpu" or temperature.requires_grad or torch.compiler.is_compiling():
            return temperature
        return None if temperature.item() == 1.0 else temperature
    return None if temperature == 1.0 else temperature


def _tracing() -> bool:
    """Whether the model is being traced or exported (jit.trace, either ONNX exporter, torch.export)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _traced(weight: Tensor, scores: Tensor, keep: Tensor | None, temperature: Tensor | float,
            scale: Tensor | None) -> Tensor:
    """The masked tensor as plain out-of-place operations, the same with or without grad, for tracers and exporters.

    The keep bits are cast to the gate's dtype: the bool-to-byte view of :func:`_keep_gate` has no ONNX or
    TorchScript translation, and a custom autograd function none either. ``keep=None``: the keep bits are in the
    scores (compact gates).
    """
    gate = torch.sigmoid(scores.to(_compute_dtype(scores, weight)) / temperature)
    return _times(weight, gate if keep is None else gate * keep.to(gate.dtype), scale)


def _keep_gate(scores: Tensor, keep: Tensor | None, divisor: Tensor | float | None, dtype: torch.dtype) -> Tensor:
    """``sigmoid(scores / T) * keep`` in one fresh buffer of ``dtype`` (the keep bits multiply as 0/1 bytes: exact
    and fast). ``keep=None``: the keep bits are in the scores, whose pruned entries' sigmoid is exactly 0."""
    raw = scores.to(dtype)
    if divisor is not None:
        raw = raw / divisor
    raw = raw.sigmoid_() if raw is not scores else torch.sigmoid(raw)
    if keep is None:
        return raw
    return raw.mul_(keep.view(torch.uint8) if keep.dtype == torch.bool else keep)


def _times(weight: Tensor, kept: Tensor, scale: Tensor | None) -> Tensor:
    """``weight * (kept [* scale])``: the masked tensor from the kept gate; a per-tensor (0-dim) scale multiplies
    the product in place (no gate-sized buffer)."""
    if scale is None:
        return weight * kept
    if scale.dim() == 0:
        return torch.mul(weight, kept).mul_(scale)
    return weight * (kept * scale)


class _Gated(torch.autograd.Function):
    """``weight * sigmoid(scores / T) * keep [* gate_scale]`` with a hand-written backward.

    Forward: one sigmoid and two (three with a scale) multiplications; one fewer with ``keep=None`` (the keep bits
    are in the scores: a pruned score's sigmoid is exactly 0). bfloat16 scores are widened to the weight's dtype
    first and their gradient is rounded back to bfloat16. Saved for backward: the weight (a
    parameter already), the scale (a buffer) and ``k = sigmoid(scores / T) * keep``, one gate-sized buffer
    where autograd's chain saves several. Backward::

        grad_weight = grad * k [* scale]
        grad_scores = sigmoid_backward(sum_to_scores(grad * weight) [* scale], k) / T   # = ... * (1 - k) * k

    which is autograd's chain for the plain formula with the same operations in the same order (``keep``
    is 0 or 1, so ``k`` is the sigmoid where kept, and a pruned entry's gradient is exactly zero), but for
    ``grad_weight``'s product order with a scale (equal up to rounding), on fresh buffers updated in place.
    Each gradient is computed only when its input requires it.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, keep: Tensor | None, divisor, scale: Tensor | None) -> Tensor:
        kept = _keep_gate(scores, keep, divisor, _compute_dtype(scores, weight))
        ctx.save_for_backward(weight, kept, scale)
        ctx.divisor = divisor
        ctx.score_dtype = scores.dtype
        return _times(weight, kept, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        weight, kept, scale = ctx.saved_tensors
        grad_weight = grad_scores = None
        if ctx.needs_input_grad[0]:
            grad_weight = grad * kept  # the weight's shape, fresh: kept and scale broadcast to it
            if scale is not None:
                grad_weight.mul_(scale)
        if ctx.needs_input_grad[1]:
            product = (grad * weight).sum_to_size(kept.shape).to(kept.dtype)  # fresh: updated in place below
            if scale is not None:
                product.mul_(scale)
            grad_scores = torch.ops.aten.sigmoid_backward.grad_input(product, kept, grad_input=product)
            if ctx.divisor is not None:
                grad_scores.div_(ctx.divisor)
            grad_scores = grad_scores.to(ctx.score_dtype)
        return grad_weight, grad_scores, None, None, None


def gated(
    weight: Tensor, scores: Tensor, keep: Tensor | None, temperature: Tensor | float, gate_scale: Tensor | None = None
) -> Tensor:
    """Return ``weight * sigmoid(scores / T) * keep`` (times ``gate_scale`` when set), the masked tensor.

    ``keep=None``: the keep bits are in the scores (pruned entries hold :data:`PRUNED_SCORE`, whose gate is 0).
    ``gate_scale`` is per entry (broadcast to the scores) or one 0-dim scalar per tensor. The values are exactly
    ``weight * (gate_value(...) * keep)`` (for a 0-dim scale, ``(weight * gate) * scale``); with gradients on, a fused
    :class:`torch.autograd.Function` computes them and keeps one gate-sized buffer for backward, against
    autograd's chain of several saved intermediates.
    """
    if _tracing():
        return _traced(weight, scores, keep, temperature, gate_scale)
    divisor = _divisor(temperature)
    if torch.is_grad_enabled() and (weight.requires_grad or scores.requires_grad or
                                    (gate_scale is not None and gate_scale.requires_grad)):
        trained = [t for t in (gate_scale, temperature) if isinstance(t, Tensor) and t.requires_grad]
        if not trained and not torch._C._are_functorch_transforms_active():
            return _Gated.apply(weight, scores, keep, divisor, gate_scale)
        # A trained scale or temperature, or torch.func transforms (grad, vmap): plain autograd handles them all.
        gate = torch.sigmoid(scores.to(_compute_dtype(scores, weight)) / temperature)
        gate = gate if keep is None else gate * keep
        return weight * gate if gate_scale is None else weight * (gate * gate_scale)
    return _times(weight, _keep_gate(scores, keep, divisor, _compute_dtype(scores, weight)), gate_scale)


def straight_through_gated(
    weight: Tensor, scores: Tensor, keep: Tensor, temperature: Tensor | float, gate_scale: Tensor | None = None
) -> Tensor:
    """Return :func:`gated`'s values, with the scores' gradient taken as if every entry were kept.

    Straight-through for the scores only (movement pruning, Sanh et al. 2020, https://arxiv.org/abs/2005.07683):
    a pruned entry's score still learns ``dL/d(w * g) * w * dg/ds``, whether the loss would want its weight
    back, so that a selection with regrowth can bring it back; the pruned weight itself gets no gradient
    (frozen until it returns). Plain autograd: it saves a few more weight-sized buffers than :func:`gated`.

    Args:
        weight, scores, keep, temperature, gate_scale: as :func:`gated` (``keep`` bool, ``scores``
            broadcastable to ``weight``).

    Returns:
        ``weight * gate * keep``, the weight's shape.
    """
    gate = gate_value(scores, temperature, gate_scale)
    kept = keep.to(gate.dtype)
    return weight * (gate * kept + (gate - gate.detach()) * (1 - kept))



def _reduce_to(scores: Tensor, shape: torch.Size) -> Tensor:
    """Average ``scores`` over the dimensions that ``shape`` keeps at size 1."""
    dims = [d for d, (have, want) in enumerate(zip(scores.shape, shape)) if want == 1 and have != 1]
    return scores.mean(dim=dims, keepdim=True) if dims else scores


class MaskGate(nn.Module):
    """Parametrization ``w -> w * sigmoid(scores / T) * keep`` with learnable ``scores``.

    Args:
        scores: initial scores, the weight's shape (element masks) or broadcastable to it (e.g. one per
            output channel, shape ``(out, 1, ...)``).
        temperature: ``T > 0``; lower is a harder gate.
        rescale: divide the gate by its initial value, so the masked network starts as the dense one
            (as Continuous Sparsification does, https://arxiv.org/abs/1912.04427): per entry, or with
            ``compact`` by one scalar per tensor, ``1 / mean(sigmoid(scores / T))``.
        score_dtype: the dtype of the scores, hence of their gradient and optimizer state: ``torch.bfloat16``
            halves them; ``None`` (the default) takes the initial scores' dtype. The gate is computed in the
            weight's dtype all the same. One of :data:`SCORE_DTYPES`.
        compact: keep no keep buffer: a pruned entry's score is set to :data:`PRUNED_SCORE`, whose gate is
            exactly 0, and ``keep`` is read off the scores (:func:`derived_keep`); the rescale is one scalar.
            The state dict still holds ``keep`` (derived on save, applied to the scores on load) and a 0-dim
            ``gate_scale``. A pruned entry's score is lost, so regrowth needs ``compact=False``.

    With ``score_dtype=torch.bfloat16, compact=True`` and Adam, a masked weight carries 8 bytes of mask state:
    2 of scores, 2 of their gradient, 2 + 2 of Adam moments (their dtype follows the scores'); per tensor, a
    temperature, a scale and Adam's step count. With float32 scores, a bool keep and a per-entry scale: 21.

    Raises:
        ValueError: ``temperature <= 0`` or a ``score_dtype`` outside :data:`SCORE_DTYPES`.
    """

    def __init__(self, scores: Tensor, temperature: float = 1.0, *, rescale: bool = False,
                 score_dtype: torch.dtype | None = None, compact: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}; pass a positive float such as 1.0")
        if score_dtype is not None and score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {[str(d) for d in SCORE_DTYPES]} or None, got "
                             f"{score_dtype!r}")
        self.compact = compact
        self.scores = nn.Parameter(scores.detach().to(score_dtype or scores.dtype, copy=True))
        if not compact:
            self._buffers["keep"] = torch.ones_like(scores, dtype=torch.bool)  # the `keep` property reads it
        self.register_buffer("temperature", torch.tensor(float(temperature), device=scores.device))
        scale = None if not rescale else torch.ones((), device=scores.device) if compact else torch.ones_like(scores)
        self.register_buffer("gate_scale", scale)
        self.enabled = True
        self.straight_through = False  # pruned entries' scores get gradients (straight_through_gated)
        self._keep_cache: tuple[int, Tensor | None] | None = None  # (scores' version, keep) under keep_bits_cached
        self.reset_scores(scores)

    @property
    def keep(self) -> Tensor:
        """The keep bits, a bool tensor of the scores' shape: the ``keep`` buffer, or (``compact``) a fresh tensor
        read off the scores, which writing into does not change: use :meth:`set_keep`."""
        stored = self._buffers.get("keep")
        if stored is not None:
            return stored
        cache, version = self._keep_cache, self.scores._version
        if cache is not None and cache[0] == version and cache[1] is not None:
            return cache[1]
        keep = derived_keep(self.scores)
        if cache is not None:  # caching (keep_bits_cached): until the scores change in place
            self._keep_cache = (version, keep)
        return keep

    def stored_keep(self) -> Tensor | None:
        """The ``keep`` buffer, or ``None`` when the keep bits are in the scores (``compact``)."""
        return self._buffers.get("keep")

    @torch.no_grad()
    def set_keep(self, keep: Tensor) -> None:
        """Set the keep bits (a bool tensor with the scores' number of entries).

        ``compact``: pruned entries get :data:`PRUNED_SCORE` (afresh, undoing any weight decay of the sentinel);
        an entry kept again after being pruned restarts from score 0 (its old score is gone).
        """
        stored = self._buffers.get("keep")
        keep = keep.reshape(self.scores.shape)
        if stored is not None:
            stored.copy_(keep)
            return
        revived = keep & (self.scores <= PRUNED_BELOW)
        self.scores.masked_fill_(~keep, PRUNED_SCORE)
        if revived.any():
            self.scores.masked_fill_(revived, 0.0)

    @torch.no_grad()
    def reset_scores(self, scores: Tensor) -> None:
        """Set the scores (and, when rescaling, the gate's initial value) in place; pruned entries stay pruned.

        Weight-shaped scores are averaged down to per-channel scores when the gate is per channel.
        """
        keep = self.keep.clone() if self.compact else None
        self.scores.copy_(_reduce_to(scores, self.scores.shape))
        if keep is not None:
            self.set_keep(keep)
        if self.gate_scale is not None:
            gate = gate_value(self.scores, self.temperature)
            if self.gate_scale.dim() == 0:
                live = gate[self.keep]
                gate = live.mean() if live.numel() else torch.ones_like(self.gate_scale)
            self.gate_scale.copy_(1.0 / gate)

    def gate(self) -> Tensor:
        """Return the soft gate (scaled when ``rescale`` was set)."""
        return gate_value(self.scores, self.temperature, self.gate_scale)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        if self.straight_through and torch.is_grad_enabled() and not _tracing():
            return straight_through_gated(weight, self.scores, self.keep, self.temperature, self.gate_scale)
        if _gate_cache is None or _tracing() or torch.compiler.is_compiling():
            return gated(weight, self.scores, self.stored_keep(), self.temperature, self.gate_scale)
        value = _gate_cache.get(self)
        if value is None:
            value = gated(weight, self.scores, self.stored_keep(), self.temperature, self.gate_scale)
            _gate_cache[self] = value
        return value

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.compact:  # the same keys as a gate with a keep buffer
            destination[prefix + "keep"] = self.keep

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.compact:
            return
        key = prefix + "keep"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        keep = state_dict.get(key)
        if keep is None:
            if strict:
                missing_keys.append(key)
        elif keep.numel() != self.scores.numel():
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(keep.shape)}, the "
                              f"shape in current model is {tuple(self.scores.shape)}.")
        else:
            self.set_keep(keep.to(device=self.scores.device, dtype=torch.bool))

    def extra_repr(self) -> str:
        compact = ", compact" if self.compact else ""
        return (f"shape={tuple(self.scores.shape)}, temperature={self.temperature.item():g}, "
                f"score_dtype={self.scores.dtype}{compact}")


class ChannelBias(nn.Module):
    """Parametrization of a bias by its layer's per-channel gate: ``b -> b * gate * keep``.

    With it a pruned output channel is entirely zero (weight row and bias), so it can be removed. The
    gate is shared with the weight's :class:`MaskGate` and is not a submodule: its tensors are saved once.
    """

    def __init__(self, gate: MaskGate) -> None:
        super().__init__()
        object.__setattr__(self, "gate", gate)

    def forward(self, bias: Tensor) -> Tensor:
        gate = self.gate
        if not gate.enabled:
            return bias
        return gated(bias, *_per_channel(gate, bias.shape))


@dataclass
class MaskedTensor:
    """One masked tensor: its gate, the original weight and every ``(module, tensor_name)`` sharing it."""

    name: str
    gate: MaskGate
    weight: Tensor
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Number of weights."""
        return self.weight.numel()

    @property
    def units(self) -> int:
        """Number of maskable units: weights, or output channels with per-channel masks."""
        return self.gate.scores.numel()

    @property
    def unit_size(self) -> int:
        """Weights per unit (1 for element masks, the channel's size for per-channel masks)."""
        return self.numel // self.units

    @property
    def axis(self) -> int:
        """The weight axis that holds output units (its layer kind's; 0 for tensors of no kind)."""
        return output_axis(*self.owners[0]) if self.owners else 0


def _tensor_slots(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, str, Tensor]]:
    """Yield ``(qualified_name, module_name, module, tensor_name, parameter)`` for every parameter slot.

    Shared modules and tied parameters are yielded once per place they appear. A parametrized tensor
    is yielded under its user-facing name with its ``original`` parameter.
    """
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (parametrize.ParametrizationList, MaskGate)):
            continue
        names = list(module._parameters)
        if parametrize.is_parametrized(module):
            names += [n for n in module.parametrizations if n not in names]
        for tensor_name in names:
            if parametrize.is_parametrized(module, tensor_name):
                tensor = getattr(module.parametrizations[tensor_name], "original", None)  # None: several originals
            else:
                tensor = module._parameters[tensor_name]
            if tensor is None:
                continue
            qualified = f"{module_name}.{tensor_name}" if module_name else tensor_name
            yield qualified, module_name, module, tensor_name, tensor


def _weight_names(module: nn.Module) -> list[str]:
    """The tensors a module glob or type selects: its layer kind's weights, else its own parameters named
    ``*weight*`` (a LayerNorm's or an Embedding's ``weight``)."""
    kind = kind_of(module)
    if kind is not None:
        return kind.tensor_names(module)
    return [name for name in _own_tensor_names(module) if "weight" in name]


def _own_tensor_names(module: nn.Module) -> list[str]:
    names = list(module._parameters)
    if parametrize.is_parametrized(module):
        names += [n for n in module.parametrizations if n not in names]
    return names


def _foreign_reason(module: nn.Module) -> str | None:
    """Why a module cannot take a mask: its weight is already computed by something else."""
    hooks = (prune.BasePruningMethod, WeightNorm, SpectralNorm)
    if any(isinstance(hook, hooks) for hook in module._forward_pre_hooks.values()):
        return "already pruned or normalised through a forward pre-hook (torch.nn.utils.prune / weight_norm / " \
               "spectral_norm); call torch.nn.utils.prune.remove(module, 'weight') or remove the norm first"
    for name in _weight_names(module):
        if parametrize.is_parametrized(module, name):
            others = [type(p).__name__ for p in module.parametrizations[name] if not isinstance(p, MaskGate)]
            if others:
                return (f"already parametrized by {others} on {name!r}; remove it first with "
                        f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})")
    return None


def _is_masked(module: nn.Module, tensor_name: str) -> bool:
    return parametrize.is_parametrized(module, tensor_name) and any(
        isinstance(p, MaskGate) for p in module.parametrizations[tensor_name]
    )


def _no_match_error(role: str, pattern: TargetSpec, candidates: Sequence[str]) -> ValueError:
    shown = difflib.get_close_matches(str(pattern), candidates, n=8, cutoff=0.3) or list(candidates[:8])
    return ValueError(
        f"{role} pattern {pattern!r} matches no module or tensor of the model; candidates include "
        f"{shown}. Fix the pattern (globs match fully-qualified names such as 'encoder.0.weight') or pass a type"
    )


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _looks_embedded(name: str) -> bool:
    """A raw parameter named like an embedding (ViT's ``cls_token``, ``position_embeddings``): left dense quietly."""
    last = name.split(" = ")[0].rpartition(".")[2].lower()
    return any(word in last for word in ("embed", "token", "position"))


def _is_foreign(module: nn.Module) -> bool:
    return _foreign_reason(module) is not None


@dataclass
class Targets:
    """What a target/exclude spec resolves to on one model (see :func:`resolve_targets`).

    ``chosen`` maps the first qualified name of each tensor to mask to every ``(module, tensor_name)`` that
    shares it. The name lists say what was left out and why: ``embeddings`` (tables, and tensors tied to one,
    left out by default), ``frozen`` (``requires_grad=False``), ``excluded`` (by ``exclude``) and ``unmasked``
    (every other trainable weight matrix: no registered layer kind, not targeted). Tied names are joined by
    ``" = "``. With explicit ``targets``, the trainable matrices they leave out are ``untargeted`` instead of
    ``unmasked``. ``foreign`` names the layers left dense by default because something else already computes
    their weight (weight_norm, spectral_norm, torch.nn.utils.prune), with why. ``named``: the chosen tensors a
    name glob in ``targets`` selected (not only a type).
    """

    chosen: dict[str, list[tuple[nn.Module, str]]]
    embeddings: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    unmasked: list[str] = field(default_factory=list)
    untargeted: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    named: list[str] = field(default_factory=list)


def resolve_targets(
    model: nn.Module,
    targets: Iterable[TargetSpec] | None = None,
    exclude: Iterable[TargetSpec] = (),
) -> Targets:
    """Resolve ``targets`` and ``exclude`` on ``model``: the tensors to mask, and what is left dense and why.

    A spec is, in this order:

    * a module type: its instances' weights (their layer kind's, see :mod:`lightning_masks.kinds`, else
      their parameters named ``*weight*``);
    * a glob on qualified module names: the weights of the matched modules that have a layer kind or, when
      none has, of every matched module whatever its type (``"transformer.wte"`` selects the embedding's
      ``weight``);
    * a glob on qualified tensor names (``"lm_head.weight"``, ``"*.bias"``): those tensors.

    ``None`` selects the weights of every registered layer kind (:func:`~lightning_masks.kinds.list_layer_kinds`)
    except embedding tables and the tensors tied to one (a tied LM head): those are masked only when a name
    glob, or an embedding type, selects them. ``exclude`` specs resolve the same way and are removed. Frozen
    (``requires_grad=False``), lazy and already-masked tensors are skipped. A parameter shared by several
    modules (tied weights) is one entry with several owners.

    Raises:
        ValueError: a target or exclude pattern that matches nothing, naming candidates; a selected module
            whose weight is already pruned, normalised or parametrized by something else.
        TypeError: a spec that is neither a string nor a module type.
    """
    slots = list(_tensor_slots(model))
    modules = list(model.named_modules())
    by_param: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for qualified, _, module, tensor_name, tensor in slots:
        by_param.setdefault(id(tensor), []).append((qualified, module, tensor_name))

    def tensors_of(selected: Iterable[nn.Module]) -> set[int]:
        picked = {id(m): set(_weight_names(m)) for m in selected}
        return {id(t) for _, _, m, tn, t in slots if tn in picked.get(id(m), ())}

    def resolve(spec: TargetSpec, role: str) -> tuple[set[int], bool]:
        """The tensors ``spec`` selects, and whether it names them explicitly (embeddings included)."""
        if isinstance(spec, type):
            return tensors_of(m for _, m in modules if isinstance(m, spec)), issubclass(spec, nn.Embedding)
        if not isinstance(spec, str):
            raise TypeError(f"{role} must be a glob string or a module type, got {spec!r}")
        matched = [m for name, m in modules if fnmatch.fnmatchcase(name, spec)]
        layers = [m for m in matched if kind_of(m) is not None]
        hits = tensors_of(layers or matched)
        if not hits:
            hits = {id(t) for q, _, _, _, t in slots if fnmatch.fnmatchcase(q, spec)}
        if not hits and not matched:
            raise _no_match_error(role, spec, [q for q, *_ in slots])
        return hits, True

    def select(specs: Iterable[TargetSpec], role: str) -> tuple[set[int], set[int], set[int]]:
        """The tensors ``specs`` select, those named explicitly (embeddings included), those named by a glob."""
        chosen: set[int] = set()
        explicit: set[int] = set()
        globbed: set[int] = set()
        for spec in specs:
            hits, named = resolve(spec, role)
            chosen |= hits
            if named:
                explicit |= hits
            if isinstance(spec, str):
                globbed |= hits
        return chosen, explicit, globbed

    embedded = {key for key, owners in by_param.items() if any(_is_embedding(m) for _, m, _ in owners)}
    targets = None if targets is None else list(targets)
    exclude = list(exclude)
    if targets is None:
        wanted, explicit, globbed = tensors_of(m for _, m in modules if kind_of(m) is not None), set(), set()
    else:
        wanted, explicit, globbed = select(targets, "target")
    excluded, _, _ = select(exclude, "exclude")
    result = Targets({})
    for name, module, reason in _foreign_layers(model, wanted - excluded, by_param, targets, exclude):
        if targets is not None:  # named: refuse; by default: leave it dense and say so
            raise ValueError(f"{type(module).__name__} {name!r} is {reason}; or leave it unmasked with "
                             f"exclude=[{name!r}]")
        wanted -= {id(t) for _, _, m, _, t in slots if m is module}
        result.foreign.append(f"{name} ({reason.split(';')[0]})")
    for key, owners in by_param.items():
        tensor = next(t for q, _, _, _, t in slots if id(t) == key and q == owners[0][0])
        name = " = ".join(q for q, _, _ in owners)
        matrix = tensor.dim() >= 2 and not isinstance(tensor, nn.parameter.UninitializedParameter)
        if any(_is_masked(m, tn) for _, m, tn in owners):
            continue
        if key in excluded:
            if matrix:
                result.excluded.append(name)
        elif not tensor.requires_grad:
            if matrix or key in wanted:
                result.frozen.append(name)
        elif key in embedded and key not in explicit:
            if key in wanted or matrix:
                result.embeddings.append(name)
        elif key in wanted and not isinstance(tensor, nn.parameter.UninitializedParameter):
            result.chosen[owners[0][0]] = [(m, tn) for _, m, tn in owners]
            if key in globbed:
                result.named.append(owners[0][0])
        elif matrix and targets is not None:
            result.untargeted.append(name)
        elif matrix and not any(_is_foreign(m) for _, m, _ in owners):
            (result.embeddings if _looks_embedded(name) else result.unmasked).append(name)
    return result


def find_targets(
    model: nn.Module,
    targets: Iterable[TargetSpec] | None = None,
    exclude: Iterable[TargetSpec] = (),
) -> dict[str, list[tuple[nn.Module, str]]]:
    """Return the tensors to mask, keyed by the first qualified name of each, with every owner.

    See :func:`resolve_targets` for the rules; this is its ``chosen``.
    """
    return resolve_targets(model, targets, exclude).chosen


def _foreign_layers(model: nn.Module, selected: set[int], by_param: dict[int, list],
                    targets: list[TargetSpec] | None, exclude: list[TargetSpec]) -> list[tuple[str, nn.Module, str]]:
    """The ``(name, module, reason)`` of each layer that would be masked but already has its weight computed by a
    hook or another parametrization (weight_norm, spectral_norm, torch.nn.utils.prune).

    Checked: the owners of the ``selected`` tensors, and the targeted layers whose weight a pruning hook renamed
    (``weight_orig``), which no spec can select any more.
    """

    def matched(specs: list[TargetSpec], name: str, module: nn.Module) -> bool:
        return any(isinstance(module, s) if isinstance(s, type) else fnmatch.fnmatchcase(name, s) for s in specs)

    owners = {id(m) for key in selected for _, m, _ in by_param.get(key, ())}
    found = []
    for name, module in model.named_modules():
        targeted = kind_of(module) is not None if targets is None else matched(targets, name, module)
        if id(module) not in owners and (not targeted or matched(exclude, name, module)):
            continue
        reason = _foreign_reason(module)
        if reason:
            found.append((name, module, reason))
    return found


def attach(
    model: nn.Module,
    targets: Iterable[TargetSpec] | None = None,
    exclude: Iterable[TargetSpec] = (),
    *,
    init: Callable[[Tensor], Tensor] = torch.abs,
    temperature: float = 1.0,
    rescale: bool = False,
    per_channel: bool = False,
    score_dtype: torch.dtype | None = None,
    compact: bool = False,
) -> list[MaskedTensor]:
    """Mask the selected tensors of ``model`` in place and return them.

    Args:
        model: any ``nn.Module``.
        targets, exclude: see :func:`find_targets`.
        init: maps a weight to its initial scores (same shape); ``torch.abs`` is magnitude.
        temperature: the gate's ``T``.
        rescale: divide each gate by its initial value (see :class:`MaskGate`).
        per_channel: one score per output channel (the layer kind's output axis: dim 0 of a Linear or Conv,
            dim 1 of a ConvTranspose or transformers' ``Conv1D``), the mean of ``init``'s scores over the
            channel; pruning a unit then zeroes the whole channel and its bias.
        score_dtype: the scores' dtype (see :class:`MaskGate`), never wider than the weight's (a bfloat16 weight
            keeps bfloat16 scores); ``None``: the weight's.
        compact: keep bits held in the scores and a per-tensor rescale (see :class:`MaskGate`).

    Raises:
        ValueError: a pattern that matches nothing, a weight holding NaN/Inf, scores of the wrong shape,
            channel masks on a grouped ConvTranspose, a ``score_dtype`` outside :data:`SCORE_DTYPES`, or no maskable
            tensor at all. The model is left unchanged.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> [m.name for m in attach(net)]
        ['0.weight', '2.weight']
    """
    if score_dtype is not None and score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {[str(d) for d in SCORE_DTYPES]} or None, got {score_dtype!r}")
    targets = None if targets is None else list(targets)
    resolved = resolve_targets(model, targets, exclude)
    found = resolved.chosen
    if not found:
        raise ValueError(_nothing_to_mask(resolved, targets))
    prepared = []
    for name, owners in found.items():
        module, tensor_name = owners[0]
        weight = getattr(module, tensor_name)
        if not torch.isfinite(weight).all():
            raise ValueError(
                f"weight {name!r} holds NaN or Inf values; fix the model's initialisation or exclude it "
                f"with `exclude=[{name!r}]`"
            )
        with torch.no_grad():
            scores = init(weight.detach())
        if scores.shape != weight.shape:
            raise ValueError(f"init returned scores of shape {tuple(scores.shape)} for {name!r} of shape "
                             f"{tuple(weight.shape)}; an initializer must keep the weight's shape")
        if per_channel:
            _refuse_grouped_transpose(name, module)
            scores = _reduce_to(scores, torch.Size(channel_shape(weight, output_axis(module, tensor_name))))
        dtype = score_dtype if score_dtype is not None and score_dtype.itemsize <= weight.dtype.itemsize else None
        prepared.append((name, owners, MaskGate(scores.to(weight), temperature, rescale=rescale, score_dtype=dtype,
                                                compact=compact)))

    done: list[tuple[nn.Module, str]] = []
    masked = []
    try:
        for name, owners, gate in prepared:
            for module, tensor_name in owners:
                original = _original(module, tensor_name)
                parametrize.register_parametrization(module, tensor_name, gate)
                _picklable(module)
                done.append((module, tensor_name))
                bias = _gated_bias(module, tensor_name, gate) if per_channel else None
                if bias is not None:
                    parametrize.register_parametrization(module, bias, ChannelBias(gate))
                    done.append((module, bias))
            masked.append(MaskedTensor(name, gate, original, list(owners)))
    except Exception:
        for module, tensor_name in reversed(done):
            _remove_gate(module, tensor_name)
        raise
    return masked


def _nothing_to_mask(resolved: Targets, targets: list[TargetSpec] | None) -> str:
    """The error for a selection that masks nothing: what was asked, what was left out and why, the fix."""
    if targets is None:
        asked = ("the model has no trainable weight of a registered layer kind (lightning_masks.kinds."
                 "list_layer_kinds(): Linear, ConvNd, ConvTransposeNd, MultiheadAttention, RNN/LSTM/GRU, "
                 "transformers' Conv1D)")
    else:
        asked = f"targets={targets!r} select no trainable, unmasked tensor"
    reasons = [f"{label} {names[:6]}" for label, names in (
        ("embedding tables (mask them by naming them in targets):", resolved.embeddings),
        ("frozen (requires_grad=False):", resolved.frozen), ("excluded:", resolved.excluded),
        ("already computed by another parametrization or hook:", resolved.foreign),
        ("of no registered layer kind:", resolved.unmasked), ("not in targets:", resolved.untargeted)) if names]
    left = f"; left out: {'; '.join(reasons)}" if reasons else ""
    return (f"no maskable tensor found: {asked}{left}. Pass `targets` naming the tensors to mask (globs on module "
            "or tensor names, or module types), or register your layer with lightning_masks.register_layer_kind")


def _refuse_grouped_transpose(name: str, module: nn.Module) -> None:
    """Channel masks need one weight index per output channel: a grouped ConvTranspose's dim 1 holds
    ``out / groups`` indices, each shared by ``groups`` output channels."""
    if getattr(module, "transposed", False) and getattr(module, "groups", 1) > 1:
        raise ValueError(f"channel masks cannot follow the output channels of {name!r}, a ConvTranspose with "
                         f"groups={module.groups} (its weight's dim 1 holds out/groups channels); leave it unmasked "
                         f"with exclude=[{name!r}] or use granularity='element'")


def _gated_bias(module: nn.Module, tensor_name: str, gate: MaskGate) -> str | None:
    """The bias a per-channel gate on ``module.<tensor_name>`` gates too (``kinds.bias_name``: one entry per
    channel, e.g. ``bias``, ``in_proj_bias``, ``bias_ih_l0``), or ``None``."""
    name = bias_name(tensor_name)
    bias = module._parameters.get(name) if name else None
    usable = (isinstance(bias, nn.Parameter) and bias.requires_grad and bias.dim() == 1
              and bias.numel() == gate.scores.numel() and not parametrize.is_parametrized(module, name))
    return name if usable else None


def _original(module: nn.Module, tensor_name: str) -> Tensor:
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return module._parameters[tensor_name]


def _remove_gate(module: nn.Module, tensor_name: str) -> None:
    """Remove our gate from ``module.tensor_name``, keeping the original parameter object."""
    _own_class(module)
    plist = module.parametrizations[tensor_name]
    ours = (MaskGate, ChannelBias)
    if all(isinstance(p, ours) for p in plist):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        return
    for index in reversed(range(len(plist))):
        if isinstance(plist[index], ours):
            del plist[index]


def _picklable(module: nn.Module) -> None:
    """Let a masked module be pickled whole (``torch.save(model)``, ``copy`` through pickle), which torch refuses for
    parametrized modules: it pickles as its own class plus its state, and gets its parametrized class back on load."""
    type(module).__reduce_ex__ = _reduce_masked


def _reduce_masked(module: nn.Module, protocol: int) -> tuple:
    cls = type(module).__bases__[0]  # the user's class, under torch's generated Parametrized<cls>
    getstate = getattr(cls, "__getstate__", None)
    state = getstate(module) if getstate is not None else module.__dict__
    return _rebuild_masked, (cls, tuple(module.parametrizations)), state


def _rebuild_masked(cls: type, names: tuple[str, ...]) -> nn.Module:
    """An empty ``cls`` instance with the class of a module parametrized on ``names`` (its state is set after)."""
    module = cls.__new__(cls)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    _picklable(module)
    return module


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before a parametrization is removed.

    torch's deep copy of a parametrized module shares its generated class with the copy, and removing a
    parametrization deletes the tensor's property from that class: folding a model would break its copies (an SWA
    or EMA average) and folding a copy would break the model.
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _per_channel(gate: MaskGate, shape: torch.Size) -> tuple:
    """The gate's ``(scores, keep, temperature, gate_scale)`` reshaped for a per-channel bias (``keep`` is
    ``None`` for a compact gate, a 0-dim scale stays as it is)."""
    scale = gate.gate_scale
    scale = scale.reshape(shape) if scale is not None and scale.dim() else scale
    keep = gate.stored_keep()
    return gate.scores.reshape(shape), None if keep is None else keep.reshape(shape), gate.temperature, scale


def _biases(entry: MaskedTensor) -> list[tuple[nn.Module, str]]:
    """The ``(module, bias name)`` of the owners' biases that this entry's gate also gates."""
    found = []
    for module, tensor_name in entry.owners:
        name = bias_name(tensor_name)
        if name and parametrize.is_parametrized(module, name) and any(
                isinstance(p, ChannelBias) and p.gate is entry.gate for p in module.parametrizations[name]):
            found.append((module, name))
    return found


def masked_tensors(model: nn.Module) -> list[MaskedTensor]:
    """Return every masked tensor of ``model`` once (tied tensors share one entry), in module order."""
    found: dict[int, MaskedTensor] = {}
    for qualified, _, module, tensor_name, tensor in _tensor_slots(model):
        if not _is_masked(module, tensor_name):
            continue
        gate = next(p for p in module.parametrizations[tensor_name] if isinstance(p, MaskGate))
        entry = found.setdefault(id(gate), MaskedTensor(qualified, gate, tensor))
        entry.owners.append((module, tensor_name))
    return list(found.values())


def mask_like(replica: nn.Module, source: nn.Module) -> list[MaskedTensor]:
    """Give ``replica``, a plain copy of ``source`` made before its masks (e.g. SWA's average model), the same masks.

    Each masked tensor of ``source`` gets a copy of its gate (scores, keep, temperature, scale) on the same place of
    ``replica``, in the same order, so that ``replica.parameters()`` pairs one to one with ``source.parameters()``.
    Returns ``replica``'s masked tensors; ``[]`` (``replica`` untouched) when it is masked already or is not a copy of
    ``source`` (another type, or a masked tensor's place missing or holding other values: a distillation teacher of
    the same class is left alone).
    """
    if type(replica) is not type(source) or masked_tensors(replica):
        return []
    names = {id(m): n for n, m in source.named_modules(remove_duplicate=False)}

    def place(module: nn.Module) -> nn.Module | None:
        try:
            return replica.get_submodule(names[id(module)])
        except AttributeError:
            return None

    places = []
    for entry in masked_tensors(source):
        owners = [(place(m), tn) for m, tn in entry.owners]
        if any(m is None or not _same_values(getattr(m, tn, None), entry.weight) for m, tn in owners):
            return []
        places.append((entry.gate, owners, [(place(m), name) for m, name in _biases(entry)]))
    for gate, owners, biases in places:
        gate = copy.deepcopy(gate)
        for module, tensor_name in owners:
            parametrize.register_parametrization(module, tensor_name, gate)
            _picklable(module)
        for module, name in biases:
            parametrize.register_parametrization(module, name, ChannelBias(gate))
    return masked_tensors(replica)


def _same_values(tensor: object, weight: Tensor) -> bool:
    return (isinstance(tensor, Tensor) and tensor.shape == weight.shape
            and torch.equal(tensor.detach().to(weight.device), weight.detach()))


def follow_masks(replica: nn.Module, source: nn.Module) -> bool:
    """Copy ``source``'s keep bits into ``replica``, a masked copy of it (one made during fit keeps that moment's).

    Returns whether ``replica`` is such a copy (the same type, masked tensors at the same places, same shapes).
    """
    if replica is source or type(replica) is not type(source):
        return False
    theirs, mine = masked_tensors(replica), masked_tensors(source)
    if [e.name for e in theirs] != [e.name for e in mine] or any(
            a.gate.keep.shape != b.gate.keep.shape for a, b in zip(theirs, mine)):
        return False
    with torch.no_grad():
        for copied, entry in zip(theirs, mine):
            if copied.gate.stored_keep() is None or copied.gate.keep is not entry.gate.keep:
                copied.gate.set_keep(entry.gate.keep)  # a compact gate holds its keep bits in its scores
    return bool(mine)


def detach(model: nn.Module) -> nn.Module:
    """Remove every mask and leave the original weights exactly as they were (the masks are lost)."""
    _detach_entries(masked_tensors(model))
    return model


def _detach_entries(entries: Iterable[MaskedTensor]) -> None:
    """Remove these entries' gates (and the channel biases they gate), leaving the originals as they are."""
    for entry in entries:
        for module, name in _biases(entry):
            _remove_gate(module, name)
        for module, tensor_name in entry.owners:
            _remove_gate(module, tensor_name)


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Bake the masks into the weights and remove them, leaving a plain module with exact zeros.

    The original ``nn.Parameter`` objects are kept (so optimizers and tied weights stay valid) and
    receive ``w * gate * keep``. Returns ``model``.
    """
    for entry in masked_tensors(model):
        gate = entry.gate
        value = masked_value(entry.weight, gate.scores, gate.stored_keep(), gate.temperature, gate.gate_scale)
        for module, name in _biases(entry):
            bias = module.parametrizations[name].original
            bias_value = masked_value(bias, *_per_channel(gate, bias.shape))
            _remove_gate(module, name)
            bias.copy_(bias_value)
        for module, tensor_name in entry.owners:
            _remove_gate(module, tensor_name)
        entry.weight.copy_(value)
    return model


_gate_cache: dict[MaskGate, Tensor] | None = None


@contextmanager
def cached_gates() -> Iterator[None]:
    """Within the block, each masked tensor is computed once (e.g. for an evaluation loop: nothing changes it).

    Unlike ``torch.nn.utils.parametrize.cached()``, tracing and exporting still see the gate's operations (and
    leave nothing in the cache): ``torch.jit.trace``, both ONNX exporters and ``torch.export`` work inside the block.
    """
    global _gate_cache
    outer, _gate_cache = _gate_cache, ({} if _gate_cache is None else _gate_cache)
    try:
        yield
    finally:
        _gate_cache = outer


@contextmanager
def keep_bits_cached(masked: Iterable[MaskedTensor]) -> Iterator[None]:
    """Within the block, a compact gate reads its keep bits off the scores once per change of the scores, not at
    every ``gate.keep`` (selection reads them several times an update: on LeNet-300-100, eleven comparison passes
    over the scores). The cached bits are dropped when the block ends; treat ``gate.keep`` as read-only within it."""
    gates = [entry.gate for entry in masked if entry.gate.stored_keep() is None]
    for gate in gates:
        gate._keep_cache = (-1, None)
    try:
        yield
    finally:
        for gate in gates:
            gate._keep_cache = None


@contextmanager
def gates_disabled(masked: Iterable[MaskedTensor]) -> Iterator[None]:
    """Within the block, masked tensors read as their plain weights (e.g. to score the dense network)."""
    gates = [entry.gate for entry in masked]
    for gate in gates:
        gate.enabled = False
    try:
        yield
    finally:
        for gate in gates:
            gate.enabled = True


def restore_masks_on_load(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Let ``model.load_state_dict`` accept a masked state dict while ``model`` is plain, and check it.

    Before loading, tensors whose keys say they were masked (``<path>.parametrizations.<name>.original``
    beside ``...0.scores``) get a gate attached, with the saved scores' dtype and, where the saved ``gate_scale``
    is one scalar, a compact gate; the load then fills scores, keep and temperature. A
    strict load whose mask tensors are missing or mis-shaped raises before anything is loaded. Returns
    the hook handle; call ``.remove()`` to stop.
    """
    return model._register_load_state_dict_pre_hook(_restore_masks, with_module=True)


def _restore_masks(module: nn.Module, state_dict: dict, prefix: str, metadata: dict, strict: bool, *args) -> None:
    """The load pre-hook of :func:`restore_masks_on_load` (a module-level function: a hooked model pickles)."""
    slots = {q: (m, tn, t) for q, _, m, tn, t in _tensor_slots(module)}
    wanted: dict[tuple[bool, bool, torch.dtype], list[str]] = {}  # (per_channel, compact, dtype) -> tensors
    for key, value in state_dict.items():
        split = split_mask_key(key[len(prefix):]) if key.startswith(prefix) else None
        if split is None or not key.endswith(".scores"):
            continue
        qualified = split[0]
        if qualified in slots and not _is_masked(*slots[qualified][:2]):
            owner, tensor_name, original = slots[qualified]
            channels = channel_shape(original, output_axis(owner, tensor_name))
            per_channel = tuple(value.shape) == channels != tuple(original.shape)
            scale = state_dict.get(key[: -len("scores")] + "gate_scale")
            compact = scale is not None and scale.dim() == 0
            dtype = value.dtype if value.dtype in SCORE_DTYPES else None
            wanted.setdefault((per_channel, compact, dtype), []).append(qualified)
    rescale = any(k.endswith(".gate_scale") for k in state_dict)
    attached = [entry for (per_channel, compact, dtype), names in wanted.items()
                for entry in attach(module, names, init=torch.zeros_like, rescale=rescale, per_channel=per_channel,
                                    score_dtype=dtype, compact=compact)]
    try:
        if strict:
            _check_mask_keys(module, state_dict, prefix)
    except ValueError:
        _detach_entries(attached)
        raise


def _check_mask_keys(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Raise if the state dict lacks, or mis-shapes, a mask tensor of ``model`` (before any is loaded)."""
    problems = []
    masked = {q for q, _, m, tn, _ in _tensor_slots(model) if parametrize.is_parametrized(m, tn)}
    for key in state_dict:
        split = split_mask_key(key[len(prefix):]) if key.startswith(prefix) else None
        if split is not None and split[0] not in masked:
            problems.append(f"{key!r} is a mask tensor of a weight the model does not mask")
    for _, module_name, module, tensor_name, tensor in _tensor_slots(model):
        if not _is_masked(module, tensor_name):
            continue
        gate = module.parametrizations[tensor_name][0]
        base = f"{prefix}{module_name + '.' if module_name else ''}parametrizations.{tensor_name}."
        expected = {"original": tensor.shape, "0.scores": gate.scores.shape, "0.keep": gate.keep.shape,
                    "0.temperature": gate.temperature.shape}
        for suffix, shape in expected.items():
            value = state_dict.get(base + suffix)
            if value is None:
                problems.append(f"{base + suffix!r} is missing")
            elif tuple(value.shape) != tuple(shape):
                problems.append(f"{base + suffix!r} has shape {tuple(value.shape)}, the model has {tuple(shape)}")
    if problems:
        raise ValueError(
            f"the state dict does not match the model's masks ({len(problems)} problems: "
            f"{'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''}); nothing was loaded. Load a "
            "checkpoint written with the same model and mask targets, or fold it with fold_checkpoint first"
        )
