"""Input feature norms of masked layers over calibration passes (the ``||x_j||_2`` of Wanda), gathered by forward
hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .kinds import kind_of, output_axis

__all__ = ["input_norms"]


@dataclass
class InputNorms:
    """Per masked tensor (by name): the sum of squares of each input feature, and the number of rows summed.

    Both are float32 tensors, so that data-parallel ranks can sum them before :meth:`rms` is read.
    """

    squares: dict[str, Tensor] = field(default_factory=dict)
    rows: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def rms(self, name: str) -> Tensor:
        """The root mean square of each input feature, shaped to broadcast against the weight ``name``.

        Raises:
            ValueError: the layer saw no input during calibration (never called by the model's forward).
        """
        rows = float(self.rows[name])
        if rows == 0:
            raise ValueError(f"{name!r} saw no input in the calibration batches (its layer is never called by "
                             "training_step); exclude it, or pick an initializer that needs no inputs")
        return (self.squares[name] / rows).sqrt().view(self.shapes[name])


def _features(name: str, module: nn.Module, tensor_name: str, weight: Tensor) -> tuple[int, tuple[int, ...]]:
    """The input's feature axis for ``module`` (whose ``tensor_name`` is the masked tensor ``name``), and the shape
    that broadcasts one value per feature on ``weight``.

    Raises:
        ValueError: a layer whose inputs do not map to one weight axis (grouped convolutions, attention's packed
            projections, recurrent layers, fused experts).
    """
    if tensor_name == "weight" and weight.dim() >= 2:
        # Linear (out, in), Conv1D (in, out), ConvNd (out, in, *k), ConvTransposeNd (in, out, *k)
        axis = 1 - output_axis(module, tensor_name)
        shape = tuple(size if dim == axis else 1 for dim, size in enumerate(weight.shape))
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:  # channels on the input's dim 1
            return 1, shape
        if weight.dim() == 2 and kind_of(module) is not None:  # a Linear-like layer: features on the last axis
            return -1, shape
    raise ValueError(f"input norms are defined for Linear, transformers' Conv1D and ungrouped ConvNd and "
                     f"ConvTransposeNd weights, not {name!r} ({type(module).__name__}.{tensor_name} "
                     f"{tuple(weight.shape)}); exclude it (exclude=[{name!r}]) or pick an initializer that needs no "
                     "inputs")


@contextmanager
def input_norms(masked: Sequence) -> Iterator[InputNorms]:
    """Sum, over the forward passes run inside the block, the squares of each input feature of every masked tensor.

    Args:
        masked: :class:`~lightning_masks.masking.masks.MaskedTensor` entries; a tensor shared by several layers sums
            the inputs of all of them.

    Yields:
        :class:`InputNorms`, filled as the block runs (read :meth:`InputNorms.rms` after it).

    Raises:
        ValueError: a masked tensor of a layer whose inputs do not map to one weight axis (before any pass).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> from lightning_masks.masking.masks import attach
        >>> masked = attach(net)
        >>> with input_norms(masked) as norms:
        ...     _ = net(torch.ones(5, 4))
        >>> norms.rms("0.weight")
        tensor([[1., 1., 1., 1.]])
    """
    norms = InputNorms()
    handles = []
    try:
        for entry in masked:
            norms.squares[entry.name] = torch.zeros(entry.weight.shape[1 - entry.axis], device=entry.weight.device)
            norms.rows[entry.name] = torch.zeros((), device=entry.weight.device)
            for module, tensor_name in entry.owners:
                axis, norms.shapes[entry.name] = _features(entry.name, module, tensor_name, entry.weight)
                handles.append(module.register_forward_pre_hook(_accumulate(norms, entry.name, axis)))
        yield norms
    finally:
        for handle in handles:
            handle.remove()


def _accumulate(norms: InputNorms, name: str, axis: int):
    def hook(module: nn.Module, args: tuple) -> None:
        features = args[0].detach().movedim(axis, -1).float()
        features = features.reshape(-1, features.shape[-1])
        norms.squares[name] += features.square().sum(0)
        norms.rows[name] += features.shape[0]

    return hook
