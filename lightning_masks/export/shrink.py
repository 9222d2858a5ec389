"""Shrink: remove the exactly-zero output channels of a folded model (Torch-Pruning's dependency graph), absorbing
constant channels into the next layer's bias."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union, cast

import torch
from torch import Tensor, nn

from .._extras import extra
from ..masking import PARAMETRIZATION_MARK, call_with, kind_of, output_axis

with extra("export"):
    import torch_pruning as tp

__all__ = ["shrink"]

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

    layer: Union[nn.Linear, nn.modules.conv._ConvNd]
    idxs: list[int]
    values: Tensor


def _out_pruner(layer: nn.Module) -> Callable:
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


def _prunable(layer: nn.Module) -> bool:
    return isinstance(layer, _PRUNED_LAYERS) and getattr(layer, "groups", 1) == 1


def _zero_rows(layer: nn.Module) -> list[int]:
    """Output channels whose weights are all exactly zero."""
    weight = cast(Tensor, layer.weight)
    return torch.nonzero(weight.detach().flatten(1).ne(0).sum(1) == 0).flatten().tolist()


def _pads_with_zeros(layer: nn.Module) -> bool:
    """Whether a conv pads its input with zeros (then a constant input channel is not constant in its output)."""
    if isinstance(layer, nn.Linear):
        return False
    conv = cast(nn.modules.conv._ConvNd, layer)  # the other prunable layers
    if conv.padding_mode != "zeros":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return not isinstance(conv.padding, str) and any(p > 0 for p in conv.padding)  # "valid" pads nothing


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


class _RunawaySearch(Exception):
    """Torch-Pruning's search for a dependency group did not end."""


_RUNAWAY = "Torch-Pruning's dependency search does not end on it (e.g. a rotary position embedding's rotate-half)"


@contextmanager
def _bounded_groups(graph) -> Iterator[None]:
    """Within the block, a dependency group that grows past four entries a graph node raises :class:`_RunawaySearch`.

    Torch-Pruning's search can cycle forever: a rotary position embedding maps channel ``i`` to ``i + d/2`` through a
    slice and a concatenation, and each pass gives indices it has not seen. Its ``Group`` is swapped for one with a
    bound while the block runs.
    """
    limit = 4 * len(graph.module2node) + 64
    module: Any = sys.modules[type(graph).__module__]  # Torch-Pruning's, untyped
    unbounded = module.Group

    class Bounded(module.Group):
        def add_dep(self, dep, idxs):
            if len(self.items) >= limit:
                raise _RunawaySearch()
            super().add_dep(dep, idxs)

    module.Group = Bounded
    try:
        yield
    finally:
        module.Group = unbounded


def _plan_channel(graph, layer: nn.Module, channel: int,
                  inputs: dict[nn.Module, Tensor]) -> Union[list[_BiasAbsorb], str]:
    """The bias absorbs that make removing ``channel`` of ``layer`` exact, or why it cannot be removed.

    Raises:
        _RunawaySearch: from :func:`_bounded_groups`.
    """
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
    bias = torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype) if layer.bias is None else layer.bias.detach()
    layer.bias = nn.Parameter(bias + weight @ absorb.values.to(weight.dtype))


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


class _Trial:
    """The state of the modules one removal touches (parameters, buffers, attributes such as ``out_features`` and
    Torch-Pruning's op offsets), to put back if the removal breaks the model. Torch-Pruning and :func:`_absorb` assign
    new tensors rather than changing them in place, so references are enough."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.saved = [(m, {k: list(v) if isinstance(v, list) else v for k, v in vars(m).items()},
                       dict(m._parameters), dict(m._buffers)) for m in dict.fromkeys(modules)]

    def undo(self) -> None:
        for module, attributes, parameters, buffers in self.saved:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            vars(module).update(attributes)


def _shrink_layer(graph, name: str, layer: nn.Module, inputs: dict[nn.Module, Tensor], report: ShrinkReport,
                  still_exact: Callable[[], Union[str, None]]) -> None:
    """Remove the removable zero output channels of one layer, absorbing constant outputs into the next biases first.

    The removal is kept only if ``still_exact()`` finds the model's outputs unchanged (``None``); otherwise it is
    undone and its reason listed in ``report.skipped`` (e.g. an attention layer whose query/key/value width must stay
    a multiple of its number of heads). ``inputs`` (from :func:`_layer_inputs`) loses the rows of the input channels
    removed here.
    """
    zero = _zero_rows(layer)
    try:
        with _bounded_groups(graph):
            plans = {c: _plan_channel(graph, layer, c, inputs) for c in zero}
            absorbs = {c: plan for c, plan in plans.items() if not isinstance(plan, str)}
            removable = list(absorbs)
            group = graph.get_pruning_group(layer, _out_pruner(layer), idxs=removable) if removable else None
    except _RunawaySearch:
        report.skipped[name] = f"{len(zero)} zero channels kept: {_RUNAWAY}"
        return
    reasons = sorted({plan for plan in plans.values() if isinstance(plan, str)})
    if reasons:
        report.skipped[name] = f"{len(zero) - len(removable)} zero channels kept: " + "; ".join(reasons)
    if removable and len(removable) == cast(Tensor, layer.weight).shape[0]:
        report.skipped[name] = f"all {len(removable)} channels are zero: the layer is kept whole"
        return
    if not removable:
        return
    assert group is not None  # removable channels have their group
    absorbed = [absorb for plan in absorbs.values() for absorb in plan]
    trial = _Trial([item.dep.target.module for item in group] + [absorb.layer for absorb in absorbed])
    readers = [(item.dep.target.module, [int(i) for i in item.idxs]) for item in group
               if getattr(item.dep.handler, "__name__", "") == "prune_in_channels" and item.dep.target.module in inputs]
    for absorb in absorbed:
        _absorb(absorb)
    group.prune()
    broken = still_exact()
    if broken is not None:
        trial.undo()
        report.skipped[name] = f"{len(removable)} zero channels kept: removing them {broken}"
        return
    for reader, idxs in readers:
        kept = torch.ones(len(inputs[reader]), dtype=torch.bool)
        kept[idxs] = False
        inputs[reader] = inputs[reader][kept]
    report.removed[name] = len(removable)
    report.absorbed[name] = sum(bool(plans[c]) for c in removable)


def output_tensors(outputs: Any) -> list[Tensor]:
    """The tensors of a model's outputs, in order, whatever holds them: tuples, lists, dicts (transformers'
    ``ModelOutput``) and other objects such as a key/value cache (``DynamicCache``), walked through their
    attributes."""
    found: list[Tensor] = []
    seen: set[int] = set()

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            found.append(value)
        elif id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None), nn.Module)):
            return
        elif isinstance(value, Mapping):
            seen.add(id(value))
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            seen.add(id(value))
            for item in value:
                walk(item)
        elif hasattr(value, "__dict__"):
            seen.add(id(value))
            for item in vars(value).values():
                walk(item)

    walk(outputs)
    return found


def _difference(before: list[Tensor], after: Any) -> Union[float, str]:
    """The largest difference between two output lists, or why they cannot be compared."""
    after = output_tensors(after)
    if len(after) != len(before):
        return f"changes the number of output tensors ({len(before)} -> {len(after)})"
    for a, b in zip(before, after):
        if a.shape != b.shape:
            return f"changes an output's shape ({tuple(a.shape)} -> {tuple(b.shape)})"
    return max((float((a.double() - b.double()).abs().max()) for a, b in zip(before, after) if a.numel()),
               default=0.0)


def _unhandled_layers(model: nn.Module, report: ShrinkReport) -> None:
    """List the layers with exactly-zero output channels that shrink cannot remove because of their type (a
    transformers ``Conv1D``, a grouped conv, a recurrent layer): they are kept as they are."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if _prunable(module) or kind_of(module) is None or not isinstance(weight, Tensor) or weight.dim() < 2:
            continue
        axis = output_axis(module, "weight")
        zero = int(weight.detach().movedim(axis, 0).flatten(1).ne(0).sum(1).eq(0).sum())
        if zero:
            report.skipped[name] = (f"{zero} zero channels kept: shrink removes channels of nn.Linear and Conv1d/2d/3d "
                                    f"with groups=1, not of a {type(module).__name__}")


@contextmanager
def _caches_off(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, the transformers models in ``model`` run without their key/value cache (their names are
    yielded): its concatenation of past and new keys is a step Torch-Pruning cannot trace. The cache's widths are
    then checked by the final comparison, made with the cache on."""
    configs: dict[int, tuple[str, Any]] = {}  # a config shared by a model's submodules, listed under the outermost
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True:
            configs.setdefault(id(config), (name, config))
    found = list(configs.values())
    for _, config in found:
        config.use_cache = False
    try:
        yield [name for name, _ in found]
    finally:
        for _, config in found:
            config.use_cache = True


def _outputs(model: nn.Module, example_inputs) -> list[Tensor]:
    """``model``'s output tensors on the example inputs, or the documented error when it cannot run on them."""
    try:
        with torch.no_grad():
            return output_tensors(call_with(model, example_inputs))
    except Exception as error:
        raise ValueError(f"{type(model).__name__} does not run on the example inputs ({type(error).__name__}: "
                         f"{error}); pass inputs of the shape and dtype it takes (token ids for a language model)"
                         ) from error


def shrink(model: nn.Module, example_inputs, *, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[nn.Module,
                                                                                                   ShrinkReport]:
    """Return an eval-mode copy of a folded model with its exactly-zero output channels removed, and a report.

    A channel of a Conv/Linear (``groups=1``) is removed when all its weights are zero, together with the
    BatchNorm entries and the input channels of the layers that read it (Torch-Pruning's dependency graph).
    When such a channel outputs a nonzero constant (its bias, a BatchNorm shift) the constant is added to the
    reading layer's bias, which is exact for a Linear or a conv without zero padding; elsewhere the channel
    is kept and the reason is in ``report.skipped``. A channel whose only reader is a BatchNorm with zero scale
    and shift there (a channel mask put on the BatchNorm) outputs exactly zero, so it is removed too
    (``report.silenced``). Each layer's removal is checked on ``example_inputs`` and undone, with its reason in
    ``report.skipped``, when the outputs change or the model no longer runs: e.g. the query/key/value projections
    of an attention layer, whose widths must stay a multiple of the number of heads, and the key/value projections
    whose outputs a transformers model returns in its cache. Zero channels of layers of other types (transformers'
    ``Conv1D``) are kept and listed too. ``model`` itself is not changed.

    Args:
        model: a plain model (fold masks first) with some exactly-zero output channels.
        example_inputs: a representative batch (two or more samples): a tensor or a tuple of positional inputs
            (token ids for a language model), or a dict of keyword inputs.
        rtol, atol: how close the shrunk model's outputs on ``example_inputs`` must be to ``model``'s.

    Raises:
        ValueError: the model still holds masks, does not run on ``example_inputs``, cannot be traced by
            Torch-Pruning, or its shrunk outputs differ (a dependency shrink cannot follow); the input model is
            unchanged either way.
    """
    if any(PARAMETRIZATION_MARK in key for key in model.state_dict()):
        raise ValueError("the model still carries masks; call lightning_masks.fold(model) before shrink")
    small = copy.deepcopy(model).eval()
    report = ShrinkReport(_count_parameters(small), 0)
    final = _outputs(small, example_inputs)
    with _caches_off(small) as cached:
        expected = _outputs(small, example_inputs)
    if len(expected) != len(final):  # the outputs hold a key/value cache
        for name in cached:
            report.skipped[name or "(model)"] = ("key/value cache: traced with use_cache=False; the cached key/value "
                                                 "widths are kept as they are")
    scale = max((float(t.abs().max()) for t in final if t.numel() and t.is_floating_point()), default=1.0)

    def still_exact(expected: list[Tensor] = expected) -> Union[str, None]:
        try:
            with torch.no_grad():
                difference = _difference(expected, call_with(small, example_inputs))
        except Exception as error:
            return f"breaks the forward ({type(error).__name__}: {str(error).splitlines()[0]})"
        if isinstance(difference, str):
            return difference
        return None if difference <= atol + rtol * scale else f"changes the outputs by up to {difference:.3g}"

    with _caches_off(small):
        try:
            graph = tp.DependencyGraph().build_dependency(small, example_inputs=example_inputs, forward_fn=call_with,
                                                          output_transform=output_tensors)
        except Exception as error:
            raise ValueError(f"Torch-Pruning could not trace {type(model).__name__} ({type(error).__name__}: "
                             f"{error}); export it unshrunk") from error
        _silence_dead_norms(graph, small, report)
        inputs = _layer_inputs(small, example_inputs)
        for name, layer in list(small.named_modules()):
            if _prunable(layer):
                _shrink_layer(graph, name, layer, inputs, report, still_exact)
    _unhandled_layers(small, report)
    broken = still_exact(final)
    if broken is not None:
        raise ValueError(f"shrinking {broken} (output scale {scale:.3g}), so a dependency was not followed; the "
                         "model is left as it was: export it unshrunk")
    report.params_after = _count_parameters(small)
    return small, report


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
