"""The plain view of a masked model: its state dict as the unmasked architecture names it, with the masks applied.

A masked tensor's state-dict keys are torch.nn.utils.parametrize's (:mod:`~lightning_masks.masking.layout`):
``<path>.parametrizations.weight.original`` and the gate's tensors. They are what a Lightning checkpoint needs to
resume, and what the plain architecture cannot load: ``from_pretrained`` or ``load_state_dict(strict=False)`` would
initialise those weights afresh. :func:`plain_state_dict` and :func:`folded_state` give ``<path>.weight = w * gate *
keep`` instead (what :func:`~lightning_masks.masking.masks.fold` would write), without changing the model;
:func:`plain_saves` makes transformers' ``save_pretrained`` use that view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from .kinds import parametrization_list
from .layout import PARAMETRIZATION_MARK
from .masks import MaskedTensor, folded_bias, folded_value, gated_biases, masked_tensors

__all__ = ["folded_state", "plain_saves", "plain_state_dict", "remove_plain_saves"]


def plain_state_dict(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
    """``model.state_dict(*args, **kwargs)`` with every mask applied and the plain keys: what the unmasked model
    would hold after :func:`~lightning_masks.masking.masks.fold`, the model itself unchanged.

    Example:
        >>> from lightning_masks.masking.masks import attach
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> _ = attach(net)
        >>> "0.parametrizations.weight.original" in net.state_dict()
        True
        >>> sorted(plain_state_dict(net))
        ['0.bias', '0.weight']
    """
    with folded_state(model):
        return model.state_dict(*args, **kwargs)


@contextmanager
def folded_state(model: nn.Module) -> Iterator[None]:
    """Within the block, the ``state_dict()`` of ``model`` and of any of its submodules gives the plain keys with the
    masks applied (``<path>.weight = w * gate * keep``, a gated bias likewise), so that code saving it the usual way
    (``torch.save(m.state_dict())``, ``safetensors.torch.save_file``, ``save_model``, a library's own save) writes a
    model the plain architecture loads. Tied tensors stay one tensor. Loading is unchanged."""
    memo: dict[str, Any] = {"state": None, "values": {}}  # one value per entry within one state_dict() call
    slots: dict[nn.Module, list[tuple[str, Callable[[], Tensor]]]] = {}
    for entry in masked_tensors(model):
        for module, name in entry.owners:
            slots.setdefault(module, []).append((name, _once(memo, entry, None)))
        for module, name in gated_biases(entry):
            slots.setdefault(module, []).append((name, _once(memo, entry, parametrization_list(module, name).original)))
    handles = [module.register_state_dict_post_hook(_plain_keys(memo, names)) for module, names in slots.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _once(memo: dict, entry: MaskedTensor, bias: Tensor | None) -> Callable[[], Tensor]:
    key = (id(entry.gate), None if bias is None else id(bias))

    def value() -> Tensor:
        if key not in memo["values"]:
            memo["values"][key] = folded_value(entry) if bias is None else folded_bias(entry, bias)
        return memo["values"][key]

    return value


def _plain_keys(memo: dict, names: list[tuple[str, Callable[[], Tensor]]]) -> Callable:
    """A state-dict post-hook that replaces a module's parametrized keys by its plain ones."""

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        if memo["state"] is not state_dict:
            memo.update(state=state_dict, values={})
        for name, value in names:
            marked = f"{prefix}{PARAMETRIZATION_MARK[1:]}{name}."
            for key in [k for k in state_dict if k.startswith(marked)]:
                del state_dict[key]
            state_dict[prefix + name] = value()

    return hook


def plain_saves(model: nn.Module) -> None:
    """Make the ``save_pretrained`` of each transformers (or alike) model in ``model`` save the plain view
    (:func:`folded_state`): a snapshot taken during training then loads with ``from_pretrained`` into the plain
    architecture with the masks as they were. Undone by :func:`remove_plain_saves`."""
    for module in model.modules():
        if callable(getattr(type(module), "save_pretrained", None)) and "save_pretrained" not in vars(module):
            setattr(module, "save_pretrained", PlainSave(module))  # an attribute nn.Module's typing does not know


class PlainSave:
    """A model's own ``save_pretrained``, called on the plain view of the model (an instance attribute of the model,
    so that copies and pickles of the model get one bound to themselves)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with folded_state(self.model):
            return getattr(type(self.model), "save_pretrained")(self.model, *args, **kwargs)  # not an nn.Module method


def remove_plain_saves(model: nn.Module) -> None:
    """Undo :func:`plain_saves`."""
    for module in model.modules():
        if isinstance(vars(module).get("save_pretrained"), PlainSave):
            del module.save_pretrained
