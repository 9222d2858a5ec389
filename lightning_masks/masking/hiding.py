"""Show a masked model as its plain self for a while: the names, types and parameters its own code expects."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from torch import nn
from torch.nn.utils import parametrize

from .gate import ChannelBias, MaskGate

__all__ = ["masks_hidden"]

_OURS = (MaskGate, ChannelBias)


@contextmanager
def masks_hidden(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` reads as if it had no masks; every module is restored exactly after.

    A masked tensor is its original ``nn.Parameter`` under its own name on its own module (``named_parameters()``
    yields ``fc.weight``, not ``fc.parametrizations.weight.original``), a masked module has its own class again
    (``type(m) is nn.Linear``, and ``m.weight`` is the parameter), and neither the scores nor the gates appear among
    ``parameters()`` or ``named_modules()``. Code that groups parameters by name and module type (minGPT's and
    nanoGPT's ``configure_optimizers``) sees what it would without the masks, and gets the very parameter objects
    that train afterwards. Parametrizations that are not masks stay in place; a forward run within the block
    computes the unmasked model.

    Yields:
        ``model``.
    """
    saved = [_hide(module) for module in model.modules() if parametrize.is_parametrized(module)]
    try:
        yield model
    finally:
        for restore in reversed([s for s in saved if s is not None]):
            restore()


def _hide(module: nn.Module):
    """Take the masks off ``module`` (see :func:`masks_hidden`); return what puts them back, or ``None``."""
    registry = cast(nn.ModuleDict, module.parametrizations)
    ours = [name for name, plist in registry.items()
            if any(isinstance(p, _OURS) for p in cast(parametrize.ParametrizationList, plist))]
    if not ours:
        return None
    cls, parameters, modules = module.__class__, dict(module._parameters), dict(module._modules)
    entries = dict(registry._modules)
    lists = {name: dict(registry[name]._modules) for name in ours}
    plain: dict = {}
    for name in ours:
        plist = cast(parametrize.ParametrizationList, registry[name])
        theirs = [p for p in plist if not isinstance(p, _OURS)]
        if theirs:  # a user's parametrization under ours: it stays, without our gate
            plist._modules.clear()
            plist._modules.update((str(i), p) for i, p in enumerate(theirs))
            continue
        del registry._modules[name]
        plain[name] = plist.original
    module._parameters.clear()
    module._parameters.update({**plain, **parameters})
    if not registry._modules:
        del module._modules["parametrizations"]
        module.__class__ = cls.__bases__[0]  # the class torch's parametrize derived the module's class from
    elif plain:
        namespace = {k: v for k, v in vars(cls).items() if k not in plain and k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)

    def restore() -> None:
        module.__class__ = cls
        for name, content in lists.items():
            entries[name]._modules.clear()
            entries[name]._modules.update(content)
        registry._modules.clear()
        registry._modules.update(entries)
        module._modules.clear()
        module._modules.update(modules)
        module._parameters.clear()
        module._parameters.update(parameters)

    return restore
