"""Which channels must be pruned together: the ``tie`` groups of a model, from Torch-Pruning's dependency graph.

Layers whose outputs meet in a residual sum share those channels: a channel can only be removed from the sum
when it is zero in every one of them. :func:`coupled_channels` finds such layers, for
``MaskPruningCallback(tie=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

from torch import nn

from .._extras import extra

__all__ = ["coupled_channels", "ties_among"]


def coupled_channels(model: nn.Module, example_inputs,
                     layers: Sequence[type[nn.Module]] = (nn.modules.batchnorm._BatchNorm,)) -> list[list[str]]:
    """Return the groups of ``layers`` whose output channels are coupled (e.g. by a residual sum), as
    ``"<module>.weight"`` names, one list per group of two or more, in module order.

    With the default, the BatchNorms that write each residual stream of a ResNet: mask them per channel and
    pass the groups as ``tie`` (see ``benchmarks/export.py``). ``layers=(nn.Linear,)`` gives the Linear layers
    writing the stream of a residual MLP without norms.

    Args:
        model: the model (a LightningModule gives names from it, such as ``"net.1.weight"``).
        example_inputs: a batch the model runs on (a tensor or a tuple of positional inputs).
        layers: the module types to group.

    Raises:
        ValueError: coupled layers of different widths (channels joined by position through an op the graph
            does not follow, such as a channel pad), or a model the dependency graph cannot trace.
    """
    with extra("export"):  # imported on use: only tie='auto' and this function need it
        import torch_pruning as tp

    was_training = model.training
    try:
        graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_inputs)
    except Exception as error:
        raise ValueError(f"Torch-Pruning could not trace the model on the example inputs ({error}); pass "
                         "inputs the model's forward accepts, or write the tie groups by hand") from error
    finally:
        model.train(was_training)
    names = {module: name for name, module in model.named_modules()}
    order = {module: index for index, module in enumerate(model.modules())}
    groups, seen = [], set()
    for module in model.modules():
        if not isinstance(module, tuple(layers)) or module in seen or module not in graph.module2node:
            continue
        pruner = graph.get_pruner_of_module(module)
        members = [module]
        for item in graph.get_pruning_group(module, pruner.prune_out_channels, idxs=[0]):
            target = item.dep.target.module
            action = getattr(item.dep.handler, "__name__", "")
            if isinstance(target, tuple(layers)) and target not in members and action == "prune_out_channels":
                members.append(cast(nn.Module, target))  # Torch-Pruning is untyped: isinstance gives object
        seen.update(members)
        if len(members) < 2:
            continue
        widths = {names[m]: graph.get_pruner_of_module(m).get_out_channels(m) for m in members}
        if len(set(widths.values())) > 1:
            raise ValueError(f"the output channels of {widths} (name: channels) are coupled but differ in number: "
                             "they meet through an op that joins channels by position, such as a channel pad "
                             "(ResNet option-A shortcuts), which cannot be pruned together; use projection shortcuts")
        groups.append([f"{names[m]}.weight" for m in sorted(members, key=order.__getitem__)])
    return groups


def ties_among(groups: Sequence[Sequence[str]], names: Iterable[str]) -> list[list[str]]:
    """``groups`` (of :func:`coupled_channels`) restricted to the tensors ``names`` (those masked), keeping the groups
    left with two or more members.

    >>> ties_among([["a.weight", "b.weight", "c.weight"], ["d.weight", "e.weight"]], ["a.weight", "c.weight"])
    [['a.weight', 'c.weight']]
    """
    names = set(names)
    return [kept for group in groups if len(kept := [name for name in group if name in names]) > 1]
