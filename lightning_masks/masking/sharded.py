"""Masks on sharded weights (FSDP2's ``fully_shard``): the gate's state sharded with its weight, local views of it.

FSDP2 shards a module's parameters along dim 0 and leaves its buffers whole on every process, and a forward that
mixes the two fails (``got mixed torch.Tensor and DTensor``). :func:`shard_with_weights`, called after
:func:`~lightning_masks.masking.masks.attach` and before ``fully_shard``, turns each gate's per-unit buffers into
frozen parameters so they are sharded with the scores and the weight: each process then holds its rows' share of
the mask state. Outside forward the sharded tensors are DTensors; :func:`local_entries` gives the masked tensors
as this process's plain local shards (views: writing their keep bits writes the shards), which selection and
statistics read.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .gate import local, local_view
from .masks import MaskedTensor

__all__ = ["is_sharded", "local_entries", "shard_with_weights"]


def is_sharded(masked: Sequence[MaskedTensor]) -> bool:
    """Whether the masked weights are DTensors (sharded by ``fully_shard``)."""
    return any(local(entry.weight) is not entry.weight for entry in masked)


def shard_with_weights(masked: Sequence[MaskedTensor]) -> None:
    """Hold each gate's per-unit buffers (the keep bits, a per-entry rescale: any buffer with the scores' dim 0) as
    frozen parameters, so that ``fully_shard`` shards them along dim 0 with the scores and the weight.

    Call it after :func:`~lightning_masks.masking.masks.attach` and before ``fully_shard``. The state dict keys do
    not change (a buffer and a parameter are saved alike). 0-dim buffers (temperature, a per-tensor rescale) stay
    whole on every process.
    """
    for entry in masked:
        gate = entry.gate
        for name, buffer in list(gate._buffers.items()):
            if buffer is not None and buffer.dim() and buffer.shape[0] == gate.scores.shape[0]:
                del gate._buffers[name]
                gate._parameters[name] = nn.Parameter(buffer, requires_grad=False)


def local_entries(masked: Sequence[MaskedTensor]) -> list[MaskedTensor]:
    """The masked tensors as this process's local shards: gates and weights over plain tensors (the same entries
    when nothing is sharded). Shapes and counts are the shard's; selection within
    :func:`~lightning_masks.selection.distributed.across_shards` counts over every process's."""
    if not is_sharded(masked):
        return list(masked)
    return [MaskedTensor(entry.name, local_view(entry.gate), local(entry.weight).detach(), entry.owners)
            for entry in masked]


def mask_state_bytes(masked: Sequence[MaskedTensor]) -> int:
    """Bytes this process holds of the gates' tensors (scores, keep bits, rescale, temperature): the local shards
    of sharded ones."""
    gates = {id(entry.gate): entry.gate for entry in masked}.values()
    return sum(local(t).numel() * t.element_size() for gate in gates
               for t in [*gate._parameters.values(), *gate._buffers.values()] if t is not None)
