"""The mask gate itself: ``w -> w * sigmoid(scores / T) * keep`` as a parametrization, its math and its caches.

:class:`MaskGate` holds the scores (their dtype is ``score_dtype``), the keep bits (packed eight a byte in a uint8
buffer, apart from anything an optimizer, a cast or a clamp of the parameters touches) and the temperature;
:func:`gated` computes the masked tensor with a hand-written backward. The gate's forward, backward, traced and
straight-through forms must agree value for value, so they are kept side by side here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor, nn

from .bits import pack_rows, unpack_rows
from .patterns import RelaxedGroups

__all__ = ["MaskGate", "along_bias", "cached_gates", "masked_value", "reduce_to", "temperature_divisor"]


#: Dtypes the scores may be kept in (``None``: the weight's). float16 is left out: its range does not hold the scores'
#: small gradients (a model cast to float16 as a whole, ``precision="16-true"``, still works).
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _compute_dtype(scores: Tensor, weight: Tensor | None = None) -> torch.dtype:
    """The dtype the gate is computed in: the scores', but bfloat16 scores are widened to the weight's dtype (to
    float32 without a weight), so that low-precision scores change neither the weight's dtype nor its precision."""
    if scores.dtype not in (torch.bfloat16, torch.float16):
        return scores.dtype
    return torch.promote_types(scores.dtype, torch.float32 if weight is None else weight.dtype)


def local(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded tensor (a DTensor, as FSDP2 holds parameters outside forward: a view of its
    storage, writes reach the shard), or ``tensor`` itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def gate_value(scores: Tensor, temperature: Tensor | float, gate_scale: Tensor | None = None) -> Tensor:
    """Return the soft gate ``sigmoid(scores / T)``, times ``gate_scale`` when one is set.

    Computed in float32 at least (bfloat16 and float16 scores are widened first).
    """
    gate = torch.sigmoid(scores.to(_compute_dtype(scores)) / temperature)
    return gate if gate_scale is None else gate * gate_scale


def masked_value(
    weight: Tensor, scores: Tensor, keep: Tensor, temperature: Tensor | float, gate_scale: Tensor | None = None,
    *, binary: bool = False,
) -> Tensor:
    """Return ``weight * gate * keep`` with pruned entries exactly zero (the fold formula); ``binary``: ``weight *
    keep``, the kept entries exactly the weight's (:func:`binary_gated`).

    ``keep`` is a bool tensor broadcastable to the weight. The products are taken in the order the live gate takes
    them, so the folded weight equals the masked one bit for bit.
    """
    if binary:
        return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    raw = torch.sigmoid(scores.to(_compute_dtype(scores, weight)) / temperature)
    value = _times(weight, raw, gate_scale)
    return torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))


def temperature_divisor(temperature: Tensor | float) -> Tensor | float | None:
    """``T``, or ``None`` where it is known to be exactly 1 without a device sync (the division is skipped)."""
    if isinstance(temperature, Tensor):
        if temperature.device.type != "cpu" or temperature.requires_grad or torch.compiler.is_compiling():
            return temperature
        return None if temperature.item() == 1.0 else temperature
    return None if temperature == 1.0 else temperature


def _tracing() -> bool:
    """Whether the model is being traced or exported (jit.trace, either ONNX exporter, torch.export)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _traced(weight: Tensor, scores: Tensor, keep: Tensor, temperature: Tensor | float,
            scale: Tensor | None) -> Tensor:
    """The masked tensor as plain out-of-place operations, the same with or without grad, for tracers and exporters.

    The keep bits are cast to the gate's dtype: the bool-to-byte view of :func:`_keep_gate` has no ONNX or
    TorchScript translation, and a custom autograd function none either.
    """
    gate = torch.sigmoid(scores.to(_compute_dtype(scores, weight)) / temperature)
    return _times(weight, gate * keep.to(gate.dtype), scale)


def _keep_gate(scores: Tensor, keep: Tensor, divisor: Tensor | float | None, dtype: torch.dtype) -> Tensor:
    """``sigmoid(scores / T) * keep`` in one fresh buffer of ``dtype`` (the keep bits multiply as 0/1 bytes: exact
    and fast)."""
    raw = scores.to(dtype)
    if divisor is not None:
        raw = raw / divisor
    raw = raw.sigmoid_() if raw is not scores else torch.sigmoid(raw)
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

    Forward: one sigmoid and two (three with a scale) multiplications. bfloat16 scores are widened to the weight's dtype
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
    def forward(ctx, weight: Tensor, scores: Tensor, keep: Tensor, divisor, scale: Tensor | None) -> Tensor:
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
    weight: Tensor, scores: Tensor, keep: Tensor, temperature: Tensor | float, gate_scale: Tensor | None = None
) -> Tensor:
    """Return ``weight * sigmoid(scores / T) * keep`` (times ``gate_scale`` when set), the masked tensor.

    ``keep`` is a bool tensor broadcastable to the weight. ``gate_scale`` is per entry (broadcast to the scores) or one
    0-dim scalar per tensor. The values are exactly ``weight * (gate_value(...) * keep)`` (for a 0-dim scale, ``(weight
    * gate) * scale``); with gradients on, a fused :class:`torch.autograd.Function` computes them and keeps one
    gate-sized buffer for backward, against autograd's chain of several saved intermediates.
    """
    if _tracing():
        return _traced(weight, scores, keep, temperature, gate_scale)
    divisor = temperature_divisor(temperature)
    if torch.is_grad_enabled() and (weight.requires_grad or scores.requires_grad or
                                    (gate_scale is not None and gate_scale.requires_grad)):
        trained = [t for t in (gate_scale, temperature) if isinstance(t, Tensor) and t.requires_grad]
        if not trained and not torch._C._are_functorch_transforms_active():
            return _Gated.apply(weight, scores, keep, divisor, gate_scale)
        # A trained scale or temperature, or torch.func transforms (grad, vmap): plain autograd handles them all.
        gate = torch.sigmoid(scores.to(_compute_dtype(scores, weight)) / temperature)
        gate = gate * keep
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


def binary_gated(
    weight: Tensor, scores: Tensor, keep: Tensor, temperature: Tensor | float, gate_scale: Tensor | None = None
) -> Tensor:
    """Return ``weight * keep``, the kept entries exactly the weight's, with the scores' gradient taken through the
    soft gate ``sigmoid(scores / T) [* gate_scale]`` as if it multiplied the weight (straight-through).

    The mask over a weight that does not train (piggyback, Mallya et al. 2018, https://arxiv.org/abs/1801.06519;
    movement pruning's hard top-k, Sanh et al. 2020): the network is the original weights times a bit mask, so
    the folded model keeps every kept weight bit for bit, while the scores still learn
    ``dL/d(w * keep) * w * dg/ds`` (every entry with a live score, kept or pruned).

    Args:
        weight, scores, keep, temperature, gate_scale: as :func:`gated`.

    Returns:
        ``weight * keep``, the weight's shape.
    """
    if not (torch.is_grad_enabled() and scores.requires_grad) or _tracing():
        return masked_value(weight, scores, keep, temperature, binary=True)
    gate = gate_value(scores, temperature, gate_scale)
    return weight * (keep.to(gate.dtype) + (gate - gate.detach()))  # the added term is exactly 0: values are w*keep


def reduce_to(scores: Tensor, shape: torch.Size) -> Tensor:
    """Average ``scores`` over the dimensions that ``shape`` keeps at size 1."""
    dims = [d for d, (have, want) in enumerate(zip(scores.shape, shape)) if want == 1 and have != 1]
    return scores.mean(dim=dims, keepdim=True) if dims else scores


class MaskGate(nn.Module):
    """Parametrization ``w -> w * sigmoid(scores / T) * keep`` with learnable ``scores``.

    The keep bits live in the ``keep_bits`` buffer, packed eight a byte, each row (slice of dim 0) of the scores
    on its own (:func:`~lightning_masks.masking.bits.pack_rows`: a slice of rows holds its rows' bits). An integer
    buffer is beyond the reach of what users, optimizers and Lightning do to floating-point parameters and buffers:
    clamps, weight decay, ``.half()`` / ``.to(dtype)``, ``precision="16-true"``, averages of the parameters. A pruned
    entry keeps its score (regrowth can bring it back).

    Args:
        scores: initial scores, the weight's shape (element masks) or broadcastable to it (e.g. one per
            output channel, shape ``(out, 1, ...)``).
        temperature: ``T > 0``; lower is a harder gate.
        rescale: divide the gate by its initial value, so the masked network starts as the dense one
            (as Continuous Sparsification does, https://arxiv.org/abs/1912.04427): per entry, or with
            ``compact`` by one scalar per tensor, ``1 / mean(sigmoid(scores / T))`` over the kept entries.
        score_dtype: the dtype of the scores, hence of their gradient and optimizer state: ``torch.bfloat16``
            halves them; ``None`` (the default) takes the initial scores' dtype. The gate is computed in the
            weight's dtype all the same. One of :data:`SCORE_DTYPES`.
        compact: the rescale is one scalar per tensor instead of a float per entry.
        binary: the masked tensor is ``w * keep`` (:func:`binary_gated`): the soft gate only carries the scores'
            gradient and ranks them, and the kept entries are the weight's own, while training and once folded
            (masks over weights that do not train). Saved as a 0-dim bool buffer ``binary``.

    With ``score_dtype=torch.bfloat16, compact=True`` and Adam, a masked weight carries 8.125 bytes of mask state:
    2 of scores, 2 of their gradient, 2 + 2 of Adam moments (their dtype follows the scores'), 1/8 of keep bits;
    per tensor, a temperature, a scale and Adam's step count. With float32 scores and a per-entry scale: 20.125.

    Raises:
        ValueError: ``temperature <= 0`` or a ``score_dtype`` outside :data:`SCORE_DTYPES`.
    """

    scores: nn.Parameter
    keep_bits: Tensor  # buffer
    temperature: Tensor  # buffer
    gate_scale: Tensor | None  # buffer, None without ``rescale``
    input_norm: Tensor | None  # buffer, None unless set_input_norm (activation-aware masks)

    def __init__(self, scores: Tensor, temperature: float = 1.0, *, rescale: bool = False,
                 score_dtype: torch.dtype | None = None, compact: bool = False, binary: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}; pass a positive float such as 1.0")
        if score_dtype is not None and score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {[str(d) for d in SCORE_DTYPES]} or None, got "
                             f"{score_dtype!r}")
        self.compact = compact
        self.scores = nn.Parameter(scores.detach().to(score_dtype or scores.dtype, copy=True))
        self.register_buffer("keep_bits", pack_rows(torch.ones_like(scores, dtype=torch.bool)))
        self.register_buffer("temperature", torch.tensor(float(temperature), device=scores.device))
        scale = None if not rescale else torch.ones((), device=scores.device) if compact else torch.ones_like(scores)
        self.register_buffer("gate_scale", scale)
        self.register_buffer("binary", torch.ones((), dtype=torch.bool, device=scores.device) if binary else None)
        self.register_buffer("input_norm", None)  # set_input_norm: activation-aware masks (Wanda)
        self.enabled = True
        self.straight_through = False  # pruned entries' scores get gradients (straight_through_gated)
        self.relaxation: RelaxedGroups | None = None  # N:M patterns sampled in training (patterns.py), binary outside
        self.shares_sample = False  # keep the forward's sample for masked() (a LoRA layer's update over this weight)
        self._last_sample: Tensor | None = None
        self._keep_cache: tuple[int, Tensor | None] | None = None  # (keep_bits' version, keep) under keep_bits_cached
        self.reset_scores(scores)

    @property
    def keep(self) -> Tensor:
        """The keep bits, a bool tensor of the scores' shape, unpacked afresh from ``keep_bits`` (writing into it
        does not change the gate: use :meth:`set_keep`)."""
        cache, version = self._keep_cache, self.keep_bits._version
        if cache is not None and cache[0] == version and cache[1] is not None:
            return cache[1]
        keep = _unpacked(self.keep_bits, self.scores)
        if cache is not None:  # caching (keep_bits_cached): until the keep bits change
            self._keep_cache = (version, keep)
        return keep

    @torch.no_grad()
    def set_keep(self, keep: Tensor) -> None:
        """Set the keep bits (a bool tensor with the scores' number of entries)."""
        self.keep_bits.copy_(pack_rows(keep.reshape(self.scores.shape).to(self.keep_bits.device)))

    @torch.no_grad()
    def set_input_norm(self, norm: Tensor) -> None:
        """Keep ``norm``, the root mean square of each input feature over calibration batches (shaped to broadcast
        against the weight, e.g. ``(1, in_features)`` for a Linear), as the buffer ``input_norm``: the
        ``effective_weight`` importance then ranks ``|w * gate| * norm``, Wanda's criterion on the effective weight
        (Sun et al. 2023, https://arxiv.org/abs/2306.11695), for the rest of the fit."""
        self.register_buffer("input_norm", norm.detach().to(device=self.scores.device, dtype=torch.float32).clone())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A saved input_norm (init="wanda") loads into a gate made without one, as a resumed fit's gates are made.
        norm = state_dict.get(prefix + "input_norm")
        if norm is not None and self.input_norm is None:
            self.set_input_norm(torch.zeros(norm.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def reset_scores(self, scores: Tensor) -> None:
        """Set the scores (and, when rescaling, the gate's initial value) in place; pruned entries stay pruned.

        Weight-shaped scores are averaged down to per-channel scores when the gate is per channel.
        """
        self.scores.copy_(reduce_to(scores, self.scores.shape))
        if self.gate_scale is not None:
            gate = gate_value(self.scores, self.temperature)
            if self.gate_scale.dim() == 0:
                live = gate[self.keep]
                gate = live.mean() if live.numel() else torch.ones_like(self.gate_scale)
            self.gate_scale.copy_(1.0 / gate)

    @property
    def is_binary(self) -> bool:
        """Whether the masked tensor is ``w * keep`` (``binary=True``), not ``w * gate * keep``."""
        return self._buffers.get("binary") is not None

    def folded(self, weight: Tensor) -> Tensor:
        """The masked value of ``weight`` as :func:`~lightning_masks.masking.masks.fold` writes it, exact zeros."""
        return masked_value(weight, self.scores, self.keep, self.temperature, self.gate_scale,
                            binary=self.is_binary)

    def _sampling(self) -> bool:
        """Whether the forward samples the relaxation's patterns (in training, with gradients, not traced)."""
        return self.relaxation is not None and self.training and torch.is_grad_enabled() and not _tracing()

    def masked(self, tensor: Tensor) -> Tensor:
        """``tensor`` masked as this gate masks its weight, uncached: the weight itself, or a tensor of its layout
        such as a LoRA adapter's update (:mod:`~lightning_masks.masking.adapters`). Under a relaxation in training,
        the patterns the weight's last forward sampled when :attr:`shares_sample` is set (consumed here, so that the
        weight and the update see one sample), else a fresh sample."""
        if self._sampling():
            assert self.relaxation is not None  # _sampling
            sample, self._last_sample = self._last_sample, None
            if sample is None:
                sample = self.relaxation.keep(self.scores)
            return tensor * sample.to(tensor.dtype)
        if self.is_binary:
            return binary_gated(tensor, self.scores, self.keep, self.temperature, self.gate_scale)
        if self.straight_through and torch.is_grad_enabled() and not _tracing():
            return straight_through_gated(tensor, self.scores, self.keep, self.temperature, self.gate_scale)
        return gated(tensor, self.scores, self.keep, self.temperature, self.gate_scale)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        if self._sampling():
            assert self.relaxation is not None  # _sampling
            sample = self.relaxation.keep(self.scores)
            if self.shares_sample:  # for the adapter's update, masked next by the same patterns (masked())
                self._last_sample = sample
            return weight * sample.to(weight.dtype)
        if _gate_cache is None or _tracing() or torch.compiler.is_compiling() or self.is_binary or (
                self.straight_through and torch.is_grad_enabled()):
            return self.masked(weight)
        value = _gate_cache.get(self)
        if value is None:
            value = self.masked(weight)
            _gate_cache[self] = value
        return value

    def extra_repr(self) -> str:
        flags = (", compact" if self.compact else "") + (", binary" if self.is_binary else "")
        return (f"shape={tuple(self.scores.shape)}, temperature={self.temperature.item():g}, "
                f"score_dtype={self.scores.dtype}{flags}")


def _unpacked(bits: Tensor, scores: Tensor) -> Tensor:
    """The bool keep bits of ``scores``' shape from their packed rows; sharded (FSDP2) packed rows give the keep
    bits sharded alike, each process unpacking its own rows."""
    if not hasattr(bits, "to_local"):
        return unpack_rows(bits, scores.shape)
    from torch.distributed.tensor import DTensor

    sharded = cast(DTensor, bits)  # has to_local: a DTensor
    local_keep = unpack_rows(local(bits), local(scores).shape)
    return DTensor.from_local(local_keep, sharded.device_mesh, sharded.placements, run_check=False,
                              shape=scores.shape, stride=scores.stride())


def local_view(gate: MaskGate) -> MaskGate:
    """A shallow copy of ``gate`` whose tensors are this process's shards (views: writes reach the shards); the
    gate's own tensors when nothing is sharded."""
    view = copy.copy(gate)
    view.__dict__["_parameters"] = {k: None if v is None else local(v).detach() for k, v in gate._parameters.items()}
    view.__dict__["_buffers"] = {k: None if v is None else local(v) for k, v in gate._buffers.items()}
    view.__dict__["_keep_cache"] = None
    return view


def along_bias(scores: Tensor, keep: Tensor, gate_scale: Tensor | None,
               shape: torch.Size) -> tuple[Tensor, Tensor, Tensor | None]:
    """A per-channel gate's ``(scores, keep, gate_scale)`` laid along its bias of ``shape`` (a 0-dim, per-tensor
    scale stays as it is)."""
    scale = gate_scale.reshape(shape) if gate_scale is not None and gate_scale.dim() else gate_scale
    return scores.reshape(shape), keep.reshape(shape), scale


def channel_gate_args(gate: MaskGate, shape: torch.Size) -> tuple:
    """The gate's ``(scores, keep, temperature, gate_scale)`` for a per-channel bias of ``shape``."""
    scores, keep, scale = along_bias(gate.scores, gate.keep, gate.gate_scale, shape)
    return scores, keep, gate.temperature, scale


class ChannelBias(nn.Module):
    """Parametrization of a bias by its layer's per-channel gate: ``b -> b * gate * keep``.

    With it a pruned output channel is entirely zero (weight row and bias), so it can be removed. The
    gate is shared with the weight's :class:`MaskGate` and is not a submodule: its tensors are saved once.
    """

    gate: MaskGate

    def __init__(self, gate: MaskGate) -> None:
        super().__init__()
        object.__setattr__(self, "gate", gate)

    def forward(self, bias: Tensor) -> Tensor:
        gate = self.gate
        if not gate.enabled:
            return bias
        return (binary_gated if gate.is_binary else gated)(bias, *channel_gate_args(gate, bias.shape))


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
