"""Learnable weight masks as a parametrization: ``w -> w * sigmoid(scores / T) * keep``.

This module knows nothing of Lightning: :func:`attach` and :func:`fold` work on any ``nn.Module``. The gate and its
math are in :mod:`lightning_masks.masking.gate`, what to mask in :mod:`lightning_masks.masking.targets` (which tensors
are weights, and which of their axes holds output units, in :mod:`lightning_masks.masking.kinds`). Loading a masked
state dict is in :mod:`lightning_masks.masking.loading`, its keys in :mod:`lightning_masks.masking.layout`; the
layer's face, :mod:`lightning_masks.masking`, exports what the other layers use.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .adapters import hold_adapter_updates, merge_under_masks, release_adapter_updates
from .gate import (
    SCORE_DTYPES,
    ChannelBias,
    MaskGate,
    channel_gate_args,
    local,
    local_view,
    masked_value,
    reduce_to,
)
from .kinds import bias_name, channel_shape, declared_axis, parametrization_list, undeclared_layout
from .targets import (
    Targets,
    TargetSpec,
    is_masked,
    nothing_to_mask,
    resolve_targets,
    tensor_slots,
)

__all__ = ["MaskedTensor", "attach", "detach", "fold", "gates_disabled", "keep_bits_cached", "masked_tensors"]


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
        return _owners_axis(self.owners)

    @property
    def unit_axis(self) -> int:
        """The axis whose entries are the output units that rows and N:M groups lie within: :attr:`axis`, or 0 for a
        1-D tensor."""
        return self.axis if self.weight.dim() > 1 else 0


def _owners_axis(owners: list[tuple[nn.Module, str]]) -> int:
    """The output axis of a tensor shared by ``owners``: the first one a layer kind declares (a tied LM head's
    Linear, not the Embedding listed before it), else 0."""
    declared = [declared_axis(module, name) for module, name in owners]
    return next((axis for axis in declared if axis is not None), 0)


def attach(
    model: nn.Module,
    targets: Iterable[TargetSpec] | None = None,
    exclude: Iterable[TargetSpec] = (),
    *,
    resolved: Targets | None = None,
    init: Callable[[Tensor], Tensor] = torch.abs,
    temperature: float = 1.0,
    rescale: bool = False,
    per_channel: bool = False,
    score_dtype: torch.dtype | None = None,
    compact: bool = False,
    frozen: str = "skip",
    binary: Collection[str] = (),
) -> list[MaskedTensor]:
    """Mask the selected tensors of ``model`` in place and return them.

    Args:
        model: any ``nn.Module``.
        targets, exclude: see :func:`find_targets`.
        resolved: ``resolve_targets(model, targets, exclude)`` when the caller has it already (it reports it too);
            ``targets`` then only names them in the error when nothing is chosen.
        init: maps a weight to its initial scores (same shape); ``torch.abs`` is magnitude.
        temperature: the gate's ``T``.
        rescale: divide each gate by its initial value (see :class:`MaskGate`).
        per_channel: one score per output channel (the layer kind's output axis: dim 0 of a Linear or Conv,
            dim 1 of a ConvTranspose or transformers' ``Conv1D``), the mean of ``init``'s scores over the
            channel; pruning a unit then zeroes the whole channel and its bias.
        score_dtype: the scores' dtype (see :class:`MaskGate`), never wider than the weight's (a bfloat16 weight
            keeps bfloat16 scores); ``None``: the weight's.
        compact: one rescale scalar per tensor instead of a float per weight (see :class:`MaskGate`).
        frozen: the targeted tensors with ``requires_grad=False``: ``"skip"`` leaves them dense, ``"mask"`` masks
            them with binary masks (``w * keep``, see :class:`MaskGate`): the weights are kept as they are;
            ``"gate"`` masks them like the others (``w * gate * keep``: the gate learns a scale for each weight).
        binary: the names (keys of ``resolved.chosen``) of further tensors whose masks are binary.

    Raises:
        ValueError: a pattern that matches nothing, a weight holding NaN/Inf, scores of the wrong shape,
            channel masks on a grouped ConvTranspose or on a matrix of no registered layer kind (whose output axis
            nothing declares: :func:`~lightning_masks.masking.kinds.register_layer_kind`), a ``score_dtype``
            outside :data:`SCORE_DTYPES`, or no maskable tensor at all. The model is left unchanged.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> [m.name for m in attach(net)]
        ['0.weight', '2.weight']
    """
    targets = None if targets is None else list(targets)
    if frozen not in ("skip", "mask", "gate"):
        raise ValueError(f"frozen must be 'skip', 'mask' or 'gate', got {frozen!r}")
    if resolved is None:
        resolved = resolve_targets(model, targets, exclude, mask_frozen=frozen != "skip")
    binary = {*binary, *resolved.frozen_chosen} if frozen == "mask" else set(binary)
    if score_dtype is not None and score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {[str(d) for d in SCORE_DTYPES]} or None, got {score_dtype!r}")
    found = resolved.chosen
    if not found:
        raise ValueError(nothing_to_mask(resolved, targets))
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
            undeclared = undeclared_layout(name, owners, tuple(weight.shape), "channel")
            if undeclared:
                raise ValueError(undeclared)
            scores = reduce_to(scores, torch.Size(channel_shape(weight, _owners_axis(owners))))
        dtype = score_dtype if score_dtype is not None and score_dtype.itemsize <= weight.dtype.itemsize else None
        prepared.append((name, owners, MaskGate(scores.to(weight), temperature, rescale=rescale, score_dtype=dtype,
                                                compact=compact, binary=name in binary)))

    done: list[tuple[nn.Module, str]] = []
    masked = []
    try:
        for name, owners, gate in prepared:
            for module, tensor_name in owners:
                original = _original(module, tensor_name)
                parametrize.register_parametrization(module, tensor_name, gate)
                make_picklable(module)
                done.append((module, tensor_name))
                bias = _gated_bias(module, tensor_name, gate) if per_channel else None
                if bias is not None:
                    parametrize.register_parametrization(module, bias, ChannelBias(gate))
                    done.append((module, bias))
            masked.append(MaskedTensor(name, gate, original, list(owners)))
        hold_adapter_updates(model)
    except Exception:
        for module, tensor_name in reversed(done):
            _remove_gate(module, tensor_name)
        release_adapter_updates(model)
        raise
    return masked


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
        return parametrization_list(module, tensor_name).original
    parameter = module._parameters[tensor_name]
    assert parameter is not None, f"{tensor_name!r} is not a parameter of {type(module).__name__}"
    return parameter


def _remove_gate(module: nn.Module, tensor_name: str) -> None:
    """Remove our gate from ``module.tensor_name``, keeping the original parameter object."""
    _own_class(module)
    plist = parametrization_list(module, tensor_name)
    ours = (MaskGate, ChannelBias)
    if all(isinstance(p, ours) for p in plist):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        return
    for index in reversed(range(len(plist))):
        if isinstance(plist[index], ours):
            del plist[index]


def make_picklable(module: nn.Module) -> None:
    """Let a masked module be pickled whole (``torch.save(model)``, ``copy`` through pickle), which torch refuses for
    parametrized modules: it pickles as its own class plus its state, and gets its parametrized class back on load."""
    setattr(type(module), "__reduce_ex__", _reduce_masked)  # setattr: mypy refuses assigning to a method


def _reduce_masked(module: nn.Module, protocol: int) -> tuple:
    cls = type(module).__bases__[0]  # the user's class, under torch's generated Parametrized<cls>
    getstate = getattr(cls, "__getstate__", None)
    state = getstate(module) if getstate is not None else module.__dict__
    return _rebuild_masked, (cls, tuple(cast(nn.ModuleDict, module.parametrizations))), state


def _rebuild_masked(cls: type[nn.Module], names: tuple[str, ...]) -> nn.Module:
    """An empty ``cls`` instance with the class of a module parametrized on ``names`` (its state is set after)."""
    module = cls.__new__(cls)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    make_picklable(module)
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


def gated_biases(entry: MaskedTensor) -> list[tuple[nn.Module, str]]:
    """The ``(module, bias name)`` of the owners' biases that this entry's gate also gates."""
    found = []
    for module, tensor_name in entry.owners:
        name = bias_name(tensor_name)
        if name and parametrize.is_parametrized(module, name) and any(
                isinstance(p, ChannelBias) and p.gate is entry.gate for p in parametrization_list(module, name)):
            found.append((module, name))
    return found


def masked_tensors(model: nn.Module) -> list[MaskedTensor]:
    """Return every masked tensor of ``model`` once (tied tensors share one entry), in module order."""
    found: dict[int, MaskedTensor] = {}
    for qualified, _, module, tensor_name, tensor in tensor_slots(model):
        if not is_masked(module, tensor_name):
            continue
        gate = next(p for p in parametrization_list(module, tensor_name) if isinstance(p, MaskGate))
        entry = found.setdefault(id(gate), MaskedTensor(qualified, gate, tensor))
        entry.owners.append((module, tensor_name))
    return list(found.values())


def detach(model: nn.Module) -> nn.Module:
    """Remove every mask and leave the original weights exactly as they were (the masks are lost)."""
    detach_entries(masked_tensors(model))
    release_adapter_updates(model)
    return model


def detach_entries(entries: Iterable[MaskedTensor]) -> None:
    """Remove these entries' gates (and the channel biases they gate), leaving the originals as they are."""
    for entry in entries:
        for module, name in gated_biases(entry):
            _remove_gate(module, name)
        for module, tensor_name in entry.owners:
            _remove_gate(module, tensor_name)


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Bake the masks into the weights and remove them, leaving a plain module with exact zeros.

    The original ``nn.Parameter`` objects are kept (so optimizers and tied weights stay valid) and
    receive ``w * gate * keep`` (a binary mask's ``w * keep``: the kept weights as they were, bit for bit);
    sharded ones (FSDP2's DTensors) shard by shard, each process folding its own.
    A masked base weight under a LoRA adapter receives ``(w + B A * scaling) * gate * keep`` and the adapter's
    ``B`` is zeroed (:mod:`lightning_masks.masking.adapters`): the model computes what it trained, and peft's
    ``merge_and_unload()`` keeps the zeros. Returns ``model``.
    """
    merge_under_masks(model)
    for entry in masked_tensors(model):
        value = folded_value(entry)
        for module, name in gated_biases(entry):
            bias = parametrization_list(module, name).original
            bias_value = folded_bias(entry, bias)
            _remove_gate(module, name)
            local(bias).copy_(bias_value)
        for module, tensor_name in entry.owners:
            _remove_gate(module, tensor_name)
        local(entry.weight).copy_(value)
    release_adapter_updates(model)
    return model


@torch.no_grad()
def folded_value(entry: MaskedTensor) -> Tensor:
    """What :func:`fold` writes into the entry's weight: ``w * gate * keep`` (a binary mask's ``w * keep``), pruned
    entries exactly zero."""
    gate = local_view(entry.gate)  # under FSDP2, this process's shard
    return masked_value(local(entry.weight), gate.scores, gate.keep, gate.temperature, gate.gate_scale,
                        binary=gate.is_binary)


@torch.no_grad()
def folded_bias(entry: MaskedTensor, bias: Tensor) -> Tensor:
    """What :func:`fold` writes into a bias that the entry's per-channel gate gates (``bias`` is its original)."""
    gate = local_view(entry.gate)
    return masked_value(local(bias), *channel_gate_args(gate, local(bias).shape), binary=gate.is_binary)


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


@contextmanager
def keep_bits_cached(masked: Iterable[MaskedTensor]) -> Iterator[None]:
    """Within the block, a gate unpacks its keep bits once per change of them, not at every ``gate.keep`` (selection
    reads them several times an update). The unpacked bits (a byte a unit) are dropped when the block ends; treat
    ``gate.keep`` as read-only within it."""
    gates = [entry.gate for entry in masked]
    for gate in gates:
        gate._keep_cache = (-1, None)
    try:
        yield
    finally:
        for gate in gates:
            gate._keep_cache = None
