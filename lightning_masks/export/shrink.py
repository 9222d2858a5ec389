"""Shrink: remove the exactly-zero output channels of a folded model (Torch-Pruning's dependency graph), absorbing
constant channels into the next layer's bias."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .._extras import extra
from ..masking.inputs import call_with
from ..masking.layout import PARAMETRIZATION_MARK

with extra("export"):
    import torch_pruning as tp

__all__ = ["ShrinkReport", "shrink"]

_PRUNED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASSED_THROUGH = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._SliceOp,
                   nn.modules.batchnorm._BatchNorm)


@dataclass
class ShrinkReport:
    """What :func:`shrink` did, per layer name: channels removed, of those the ones whose constant output was
    ``absorbed`` into the next layer's bias, and kept (``skipped``, with why); ``silenced`` counts the channels
    zeroed because the BatchNorm after them has zero scale and shift."""

    params_before: int
    params_after: int
    removed: dict[str, int] = field(default_factory=dict)
    absorbed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    silenced: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _BiasAbsorb:
    """Add ``weight[:, idxs] @ values`` (summed over the kernel) to ``layer``'s bias before ``idxs`` go."""

    layer: nn.Module
    idxs: list[int]
    values: Tensor


def _out_pruner(layer: nn.Module) -> Callable:
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


def _prunable(layer: nn.Module) -> bool:
    return isinstance(layer, _PRUNED_LAYERS) and getattr(layer, "groups", 1) == 1


def _zero_rows(layer: nn.Module) -> list[int]:
    """Output channels whose weights are all exactly zero."""
    return torch.nonzero(layer.weight.detach().flatten(1).ne(0).sum(1) == 0).flatten().tolist()


def _pads_with_zeros(layer: nn.Module) -> bool:
    """Whether a conv pads its input with zeros (then a constant input channel is not constant in its output)."""
    if isinstance(layer, nn.Linear) or layer.padding_mode != "zeros":
        return False
    if layer.padding == "same":
        return any(k > 1 for k in layer.kernel_size)
    return layer.padding != "valid" and any(p > 0 for p in layer.padding)


@torch.no_grad()
def _layer_inputs(model: nn.Module, example_inputs) -> dict[nn.Module, Tensor]:
    """Each prunable layer's input on ``example_inputs``, as ``(features or channels, samples)``."""
    seen: dict[nn.Module, Tensor] = {}

    def record(layer, args):
        x = args[0]
        seen[layer] = x.reshape(-1, x.shape[-1]).T if isinstance(layer, nn.Linear) else x.transpose(0, 1).flatten(1)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if _prunable(m)]
    try:
        call_with(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _plan_channel(graph, layer: nn.Module, channel: int,
                  inputs: dict[nn.Module, Tensor]) -> Union[list[_BiasAbsorb], str]:
    """The bias absorbs that make removing ``channel`` of ``layer`` exact, or why it cannot be removed."""
    absorbs: list[_BiasAbsorb] = []
    consumers = 0
    for item in graph.get_pruning_group(layer, _out_pruner(layer), idxs=[channel]):
        module, idxs = item.dep.target.module, [int(i) for i in item.idxs]
        action = getattr(item.dep.handler, "__name__", "")
        if isinstance(module, _PRUNED_LAYERS) and max(idxs) >= module.weight.shape[action == "prune_in_channels"]:
            return "the dependency graph maps it past a layer's channels (an op it does not follow, e.g. a pad)"
        if isinstance(module, _PRUNED_LAYERS) and action == "prune_out_channels":
            if module.weight.detach()[idxs].ne(0).any():
                return "coupled to a nonzero channel of another layer (e.g. a residual sum)"
        elif isinstance(module, _PRUNED_LAYERS) and action == "prune_in_channels":
            if not _prunable(module) or module not in inputs:
                return f"read by a {type(module).__name__} that shrink does not handle"
            consumers += 1
            rows = inputs[module][idxs]
            if not torch.equal(rows, rows[:, :1].expand_as(rows)):
                return f"reaches a {type(module).__name__} input that varies with the input"
            if rows[:, 0].ne(0).any():
                if _pads_with_zeros(module):
                    return "constant output read by a zero-padded conv: not absorbable into its bias"
                absorbs.append(_BiasAbsorb(module, idxs, rows[:, 0].clone()))
        elif not isinstance(module, _PASSED_THROUGH):
            return f"reaches a {type(module).__name__} that shrink does not handle"
    return absorbs if consumers else "feeds the model output"


@torch.no_grad()
def _absorb(absorb: _BiasAbsorb) -> None:
    """Add the constant inputs' contribution to the layer's bias (created when the layer has none)."""
    layer = absorb.layer
    weight = layer.weight.detach()[:, absorb.idxs]
    if weight.dim() > 2:  # a conv without zero padding sees the constant at every tap of the kernel
        weight = weight.flatten(2).sum(2)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    layer.bias += weight @ absorb.values.to(weight.dtype)


@torch.no_grad()
def _silence_dead_norms(graph, model: nn.Module, report: ShrinkReport) -> None:
    """Zero the output channels of a layer whose only reader is a BatchNorm with zero scale and shift there.

    Such a BatchNorm outputs exactly zero on those channels whatever its input (a channel mask on the
    BatchNorm, as in Network Slimming), so zeroing the layer's rows (and bias) changes nothing and lets
    :func:`shrink` remove the channel with the BatchNorm entry.
    """
    names = {module: name for name, module in model.named_modules()}
    for norm, node in graph.module2node.items():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.affine or len(node.inputs) != 1:
            continue
        layer = node.inputs[0].module
        if not _prunable(layer) or [n.module for n in graph.module2node[layer].outputs] != [norm]:
            continue
        dead = (norm.weight == 0) & (norm.bias == 0) & layer.weight.flatten(1).ne(0).any(1)
        if dead.any():
            layer.weight[dead] = 0
            if layer.bias is not None:
                layer.bias[dead] = 0
            report.silenced[names[layer]] = int(dead.sum())


def _shrink_layer(graph, name: str, layer: nn.Module, inputs: dict[nn.Module, Tensor], report: ShrinkReport) -> None:
    """Remove the removable zero output channels of one layer, absorbing constant outputs into the next biases first.

    ``inputs`` (from :func:`_layer_inputs`) loses the rows of the input channels removed here.
    """
    zero = _zero_rows(layer)
    plans = {c: _plan_channel(graph, layer, c, inputs) for c in zero}
    removable = [c for c, plan in plans.items() if not isinstance(plan, str)]
    reasons = sorted({plan for plan in plans.values() if isinstance(plan, str)})
    if reasons:
        report.skipped[name] = f"{len(zero) - len(removable)} zero channels kept: " + "; ".join(reasons)
    if removable and len(removable) == layer.weight.shape[0]:
        report.skipped[name] = f"all {len(removable)} channels are zero: the layer is kept whole"
        return
    if not removable:
        return
    for c in removable:
        for absorb in plans[c]:
            _absorb(absorb)
    group = graph.get_pruning_group(layer, _out_pruner(layer), idxs=removable)
    readers = [(item.dep.target.module, [int(i) for i in item.idxs]) for item in group
               if getattr(item.dep.handler, "__name__", "") == "prune_in_channels" and item.dep.target.module in inputs]
    group.prune()
    for reader, idxs in readers:
        kept = torch.ones(len(inputs[reader]), dtype=torch.bool)
        kept[idxs] = False
        inputs[reader] = inputs[reader][kept]
    report.removed[name] = len(removable)
    report.absorbed[name] = sum(bool(plans[c]) for c in removable)


def _max_difference(before, after) -> float:
    pairs = list(zip(tree_leaves(before), tree_leaves(after)))
    if len(tree_leaves(before)) != len(tree_leaves(after)) or any(a.shape != b.shape for a, b in pairs):
        return float("inf")
    return max((float((a - b).abs().max()) for a, b in pairs if a.numel()), default=0.0)


def shrink(model: nn.Module, example_inputs, *, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[nn.Module,
                                                                                                   ShrinkReport]:
    """Return an eval-mode copy of a folded model with its exactly-zero output channels removed, and a report.

    A channel of a Conv/Linear (``groups=1``) is removed when all its weights are zero, together with the
    BatchNorm entries and the input channels of the layers that read it (Torch-Pruning's dependency graph).
    When such a channel outputs a nonzero constant (its bias, a BatchNorm shift) the constant is added to the
    reading layer's bias, which is exact for a Linear or a conv without zero padding; elsewhere the channel
    is kept and the reason is in ``report.skipped``. A channel whose only reader is a BatchNorm with zero scale
    and shift there (a channel mask put on the BatchNorm) outputs exactly zero, so it is removed too
    (``report.silenced``). ``model`` itself is not changed.

    Args:
        model: a plain model (fold masks first) with some exactly-zero output channels.
        example_inputs: a representative batch (two or more samples), a tensor or a tuple of positional inputs.
        rtol, atol: how close the shrunk model's outputs on ``example_inputs`` must be to ``model``'s.

    Raises:
        ValueError: the model still holds masks, or the shrunk model's outputs differ (a graph shrink cannot
            follow); the input model is unchanged either way.
    """
    if any(PARAMETRIZATION_MARK in key for key in model.state_dict()):
        raise ValueError("the model still carries masks; call lightning_masks.fold(model) before shrink")
    small = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = call_with(small, example_inputs)
    report = ShrinkReport(_count_parameters(small), 0)
    graph = tp.DependencyGraph().build_dependency(small, example_inputs=example_inputs)
    _silence_dead_norms(graph, small, report)
    inputs = _layer_inputs(small, example_inputs)
    for name, layer in list(small.named_modules()):
        if _prunable(layer):
            _shrink_layer(graph, name, layer, inputs, report)
    with torch.no_grad():
        difference = _max_difference(expected, call_with(small, example_inputs))
    scale = max(float(t.abs().max()) for t in tree_leaves(expected) if t.numel())
    if difference > atol + rtol * scale:
        raise ValueError(f"shrinking changed the outputs by up to {difference:.3g} (scale {scale:.3g}), so a "
                         "dependency was not followed; the model is left as it was: export it unshrunk")
    report.params_after = _count_parameters(small)
    return small, report


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
