"""Which layers produce a model's outputs: the ones channel pruning must keep whole (classes, vocabulary)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .kinds import kind_of
from .targets import TargetSpec, resolve_targets

__all__ = ["kept_whole"]


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a nested structure of tuples, lists and mappings (e.g. a transformers ``ModelOutput``)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def output_layers(candidates: Mapping[str, nn.Module], run: Callable[[], Any]) -> list[str]:
    """Return the names of the ``candidates`` whose outputs reach ``run()``'s result through no other candidate.

    ``run`` is one forward pass (e.g. ``model(example_input)``, or a training step's loss); the walk goes back
    from every tensor of its result through autograd's graph and stops at the first candidate output on each
    path: for a classifier that is its last Linear (whatever activation, log-softmax or loss follows), for a
    language model its head, for an autoencoder its last (transposed) conv. Gradients are enabled for the pass;
    nothing is backpropagated.

    Args:
        candidates: layers by qualified name.
        run: a callable that runs the model once and returns its outputs (tensors, possibly nested).

    Returns:
        The names, in ``candidates``' order; empty when no output tensor carries a graph (e.g. a frozen model).
    """
    produced: dict[Any, str] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for tensor in _tensors(output):
                if tensor.grad_fn is not None:
                    produced.setdefault(tensor.grad_fn, name)
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in candidates.items()]
    try:
        with torch.enable_grad():
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in _tensors(result) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in produced:
            found.add(produced[node])
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return [name for name in candidates if name in found]


def kept_whole(model: nn.Module, targets: Optional[Iterable[TargetSpec]], named: Iterable[str],
               run: Optional[Callable[[], Any]]) -> Optional[list[str]]:
    """The layers that channel pruning keeps whole, as module names: ``named``, a list of globs on module names
    (each must match a module, or ``ValueError``), or, when ``named == "auto"``, the :func:`output_layers` of ``run``
    among the layers that could carry a mask, less those a name glob in ``targets`` chose (explicit targets win).
    ``None`` when ``run`` is ``None`` or the trace finds no output layer (the caller warns)."""
    names = [name for name, _ in model.named_modules()]
    if named != "auto":
        for pattern in named:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"output_layers pattern {pattern!r} matches no module of the model; globs match "
                                 f"module names such as {names[-1]!r}")
        return list(named)
    targeted = resolve_targets(model, targets)
    owners = {id(m) for found in targeted.chosen.values() for m, _ in found}
    chosen_by_name = {id(m) for name in targeted.named for m, _ in targeted.chosen[name]}
    # Every layer that could carry a mask, excluded ones too: an output layer is the last of them on its path.
    candidates = {name: module for name, module in model.named_modules()
                  if kind_of(module) is not None or id(module) in owners}
    found = output_layers(candidates, run) if run is not None else []
    return [name for name in found if id(candidates[name]) not in chosen_by_name] if found else None
