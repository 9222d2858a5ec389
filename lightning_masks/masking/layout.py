"""The state-dict layout of a masked tensor, owned here: every reader and writer of masked keys derives from it.

A tensor ``<path>.<name>`` masked by :class:`~lightning_masks.masking.gate.MaskGate` is saved, as
``torch.nn.utils.parametrize`` writes it, under ``<path>.parametrizations.<name>.`` followed by ``original`` (the
weight) and the gate's tensors ``0.scores``, ``0.keep_bits`` (uint8, the keep bits packed eight a byte, row by row
along the scores' dim 0: :func:`~lightning_masks.masking.bits.pack_rows`), ``0.temperature`` and, when the gate
rescales, ``0.gate_scale``. A bias gated by its layer's per-channel mask
(:class:`~lightning_masks.masking.gate.ChannelBias`) saves its ``original`` only: its gate is its weight's
(:func:`~lightning_masks.masking.kinds.weight_name`).
"""

from __future__ import annotations

from torch import Tensor

from .bits import unpack_rows

__all__ = [
    "GATE_FIELDS",
    "ORIGINAL",
    "PARAMETRIZATION_MARK",
    "REQUIRED_FIELDS",
    "group_mask_keys",
    "mask_key",
    "saved_keep",
    "split_mask_key",
]

PARAMETRIZATION_MARK = ".parametrizations."
ORIGINAL = "original"
GATE_FIELDS = ("scores", "keep_bits", "temperature", "gate_scale", "binary", "input_norm")  # MaskGate's state dict
REQUIRED_FIELDS = (ORIGINAL, "scores", "keep_bits", "temperature")  # the others only where set
_GATE_INDEX = "0."  # our gate is the first (and only) parametrization of the tensor


def mask_key(tensor: str, field: str) -> str:
    """The state-dict key of ``field`` (``original``, one of :data:`GATE_FIELDS`, or another parametrization's raw
    field such as ``"1.weight_g"``) of the masked ``tensor``; the inverse of :func:`split_mask_key`.

    >>> mask_key("net.0.weight", "scores")
    'net.0.parametrizations.weight.0.scores'
    >>> mask_key("weight", "original")
    'parametrizations.weight.original'
    """
    path, _, name = tensor.rpartition(".")
    field = _GATE_INDEX + field if field in GATE_FIELDS else field
    return f"{path + '.' if path else ''}{PARAMETRIZATION_MARK[1:]}{name}.{field}"


def split_mask_key(key: str) -> tuple[str, str] | None:
    """Split a parametrized state-dict key into ``(tensor, field)``, or ``None`` for any other key.

    >>> split_mask_key("net.0.parametrizations.weight.0.scores")
    ('net.0.weight', 'scores')
    >>> split_mask_key("net.0.parametrizations.weight.original")
    ('net.0.weight', 'original')

    A field of another parametrization stacked on the tensor keeps its index (``"1.weight_g"``), so that it is not
    taken for ours.
    """
    path, mark, rest = ("." + key).partition(PARAMETRIZATION_MARK)  # the dot also finds a root module's keys
    if not mark:
        return None
    tensor_name, _, field = rest.partition(".")
    if field.startswith(_GATE_INDEX) and field[len(_GATE_INDEX):] in GATE_FIELDS:
        field = field[len(_GATE_INDEX):]
    return (f"{path[1:]}.{tensor_name}" if path else tensor_name), field


def group_mask_keys(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, dict[str, Tensor]]:
    """The masked tensors of ``state_dict`` (keys under ``prefix``, which is stripped): ``{tensor: {field: value}}``.

    Fields outside ``original`` and :data:`GATE_FIELDS` (another parametrization's) are kept under their raw names.

    >>> import torch
    >>> group_mask_keys({"a.parametrizations.weight.original": torch.ones(2), "a.bias": torch.ones(2)})
    {'a.weight': {'original': tensor([1., 1.])}}
    """
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        split = split_mask_key(key[len(prefix):]) if key.startswith(prefix) else None
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = value
    return grouped


def saved_keep(fields: dict[str, Tensor]) -> Tensor:
    """The keep bits of one masked tensor's saved ``fields`` (as :func:`group_mask_keys` gives them), unpacked: a bool
    tensor of the scores' shape.

    >>> import torch
    >>> bits = torch.tensor([[0b10100000], [0b01000000]], dtype=torch.uint8)
    >>> saved_keep({"scores": torch.zeros(2, 3), "keep_bits": bits})
    tensor([[ True, False,  True],
            [False,  True, False]])
    """
    return unpack_rows(fields["keep_bits"], fields["scores"].shape)
