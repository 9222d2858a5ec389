"""Masks under Lightning's ``ModelParallelStrategy`` (FSDP2's ``fully_shard``): what the callback does differently.

The masks attach before ``configure_model`` shards the layers (a parametrization registered after ``fully_shard``
fails at the first forward), with their per-unit state held as parameters so that it is sharded with the weights
(:func:`~lightning_masks.masking.sharded.shard_with_weights`). Selection and statistics run on each process's local
shards and sum their counts over the data-parallel group (:mod:`~lightning_masks.selection.distributed`): the keep
bits are those one process would choose on the whole tensors, and no process gathers them. Tensor parallelism
(``tensor_parallel_size > 1``) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ..masking import MaskedTensor, is_sharded, local_entries, resolve_targets, stats
from ..selection import Selector, across_shards

__all__ = ["full_state_dict", "mask_before_sharding"]


def model_parallel(trainer: pl.Trainer) -> bool:
    """Whether the fit runs under ``ModelParallelStrategy`` (FSDP2)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def check_model_parallel(strategy: ModelParallelStrategy) -> None:
    """Raise ``ValueError`` for tensor parallelism: the masks follow FSDP2's dim-0 shards only."""
    size = strategy._tensor_parallel_size  # "auto" until setup_environment: the number of processes
    if size != 1:
        raise ValueError(
            f"MaskPruningCallback supports ModelParallelStrategy with FSDP2 data parallelism only, got "
            f"tensor_parallel_size={size!r} (tensor parallelism splits weights along the axes masks are selected on; "
            "'auto' means all devices of a node). Use ModelParallelStrategy(data_parallel_size=<devices>, "
            "tensor_parallel_size=1) with fully_shard in configure_model, or strategy='ddp'"
        )


def _data_parallel_group(trainer: pl.Trainer) -> Any:
    """The process group the shards are spread over (FSDP2's data-parallel mesh dimension)."""
    strategy = cast(ModelParallelStrategy, trainer.strategy)  # the one strategy that shards the masks
    return strategy.device_mesh["data_parallel"].get_group()


def reshard(pl_module: nn.Module) -> None:
    """Put every FSDP2 module's sharded parameters back in place (``FSDPModule.reshard``): outside forward the root
    module's stay gathered after a forward without backward (validation), and the masks are read from the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in pl_module.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def counting(trainer: pl.Trainer, masked: Sequence[MaskedTensor]):
    """The block within which selection counts over every process's shards (a no-op when nothing is sharded)."""
    return across_shards(_data_parallel_group(trainer)) if is_sharded(masked) else nullcontext()


def mask_before_sharding(pl_module: pl.LightningModule) -> None:
    """Attach the masks of the Trainer's ``MaskPruningCallback`` now, in ``configure_model``, before ``fully_shard``.

    Needed only when ``configure_model`` builds the layers it shards (layers built in ``__init__`` or ``setup`` are
    masked before ``configure_model`` runs, with nothing to call). One line between building and sharding::

        def configure_model(self):
            self.model = build_transformer()
            mask_before_sharding(self)
            for block in self.model.layers:
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    Raises:
        ValueError: the Trainer has no ``MaskPruningCallback``, or the layers are sharded already.
    """
    from .callback import MaskPruningCallback

    trainer = pl_module.trainer
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
    found = [callback for callback in callbacks if isinstance(callback, MaskPruningCallback)]
    if not found:
        raise ValueError("mask_before_sharding found no MaskPruningCallback among the Trainer's callbacks; add "
                         "one: Trainer(callbacks=[MaskPruningCallback(...)])")
    if any(getattr(p, "to_local", None) is not None for p in pl_module.parameters()):
        raise ValueError("mask_before_sharding was called after fully_shard; call it before the first fully_shard "
                         "in configure_model")
    found[0].mask_before_sharding(trainer, pl_module)


def refuse_unmasked_shards(pl_module: pl.LightningModule) -> None:
    """Raise if ``configure_model`` sharded the module before it was masked (the masks would fail at the first
    forward: a parametrization must be registered before ``fully_shard``)."""
    if any(getattr(p, "to_local", None) is not None for p in pl_module.parameters()):
        raise ValueError(
            "configure_model built and sharded layers that MaskPruningCallback could not mask before fully_shard "
            "(masks must be attached to unsharded layers). Call lightning_masks.mask_before_sharding(self) in "
            "configure_model between building the layers and the first fully_shard, or build them in __init__"
        )


def check_shard_layout(masked: Sequence[MaskedTensor], selector: Selector) -> None:
    """Raise if a masked weight is not sharded on dim 0 (``fully_shard`` missed it), or channel, N:M or per-row
    (``mode="row"``) masks would not follow FSDP2's dim-0 shards: a shard must hold whole output units
    (their rows), which it does where the layer kind's output axis is dim 0 (Linear, Conv), not where it is dim 1
    (ConvTranspose, transformers' ``Conv1D``: a dim-0 shard splits their channels and N:M groups)."""
    from torch.distributed.tensor import Shard

    whole = [entry.name for entry in masked if tuple(getattr(entry.weight, "placements", ())) != (Shard(0),)]
    if whole:  # each process would count a replicated tensor as its own
        raise ValueError(f"under ModelParallelStrategy every masked weight must be sharded by fully_shard (on dim 0 "
                         f"of the data-parallel mesh), but {stats.short_names(whole)} are not; call fully_shard on "
                         "the modules holding them (fully_shard on the root covers what no other call did), or "
                         "exclude them (exclude=[...])")
    grain, rows = selector.grain, selector.mode == "row"
    if not (grain.channel or grain.is_nm or rows):
        return
    # a row (mode='row') must lie whole in one shard too: a 1-D tensor is one row, which the shards split
    across = [entry.name for entry in masked if entry.weight.dim() > 1 and entry.axis != 0 or
              rows and entry.weight.dim() == 1]
    if across:
        setting = "mode='row'" if rows else f"granularity={selector.granularity!r}"
        fix = "mode='layer'" if rows else "granularity='element'"
        raise ValueError(f"{setting} under FSDP2 needs whole output units on each shard (fully_shard splits dim 0), "
                         f"but {stats.short_names(across)} hold theirs on dim 1 or are 1-D; exclude them "
                         f"(exclude=[...]) or use {fix}")


def warn_built_after_masking(pl_module: pl.LightningModule, targets: Any, exclude: Sequence) -> None:
    """Warn, naming them, about targets left dense because ``configure_model`` built them after the masks attached
    (and sharded them without :func:`mask_before_sharding`)."""
    try:
        late = list(resolve_targets(pl_module, targets, exclude).chosen)
    except ValueError:
        return
    if late:
        rank_zero_warn(f"lightning_masks: {len(late)} target tensors built in configure_model are left dense: "
                       f"{stats.short_names(late)}; call lightning_masks.mask_before_sharding(self) in configure_model "
                       "after building them, before the first fully_shard")


def layer_rows(masked: Sequence[MaskedTensor]) -> list[dict]:
    """:func:`~lightning_masks.masking.stats.layer_rows` over every process's shards (a collective call)."""
    rows = stats.layer_rows(local_entries(masked))
    if not is_sharded(masked):
        return rows
    kept = torch.tensor([row["kept"] for row in rows], dtype=torch.int64)
    dist.all_reduce(kept)
    return [{**row, "shape": "x".join(map(str, entry.weight.shape)), "kept": n, "total": entry.numel,
             "sparsity": 1 - n / entry.numel} for row, entry, n in zip(rows, masked, kept.tolist())]


_SUMS = ("total", "kept", "live", "gate_sum", "gate_sumsq", "undecided", "flips")


def _reduce_moments(moments: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Per-tensor moments summed (min and max taken) over the processes, in three all-reduces."""
    if not moments:
        return moments
    sums = torch.stack([torch.stack([m[k].float() for k in _SUMS if k != "total"]) for m in moments])
    low = torch.stack([m["gate_min"].float().nan_to_num(float("inf")) for m in moments])
    high = torch.stack([m["gate_max"].float().nan_to_num(float("-inf")) for m in moments])
    dist.all_reduce(sums)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    summed = [k for k in _SUMS if k != "total"]
    return [{**m, **dict(zip(summed, row)), "gate_min": lo if lo.isfinite() else lo.new_tensor(float("nan")),
             "gate_max": hi if hi.isfinite() else hi.new_tensor(float("nan"))}
            for m, row, lo, hi in zip(moments, sums, low, high)]


def mask_stats(masked: Sequence[MaskedTensor], flips: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`~lightning_masks.masking.stats.mask_stats` over every process's shards (a collective call)."""
    if not is_sharded(masked):
        return stats.mask_stats(masked, flips)
    totals = [torch.tensor(float(entry.numel)) for entry in masked]  # the whole tensors' sizes
    flips = {name: value.float() for name, value in flips.items()}
    return stats.mask_stats(local_entries(masked), flips, combine=lambda moments: [
        {**m, "total": t} for m, t in zip(_reduce_moments(moments), totals)])


def gate_histograms(masked: Sequence[MaskedTensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per masked tensor, the histogram of its live gates in [0, 1], summed over every process's shards."""
    found = {entry.name: stats.histogram(stats.live_gates(entry)) for entry in local_entries(masked)}
    if is_sharded(masked) and found:
        counts = torch.stack([c for c, _ in found.values()])
        dist.all_reduce(counts)
        found = {name: (c, edges) for (name, (_, edges)), c in zip(found.items(), counts)}
    return found


def histograms(masked: Sequence[MaskedTensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """The logged histograms (``masks/<tensor>/gates`` and ``masks/<tensor>/scores`` of the live entries) over
    every process's shards: the scores binned between their global min and max."""
    result = {f"masks/{name}/gates": value for name, value in gate_histograms(masked).items()}
    entries = local_entries(masked)
    live = [entry.gate.scores.detach()[entry.gate.keep].float() for entry in entries]
    low = torch.tensor([s.min() if s.numel() else float("inf") for s in live])
    high = torch.tensor([s.max() if s.numel() else float("-inf") for s in live])
    if is_sharded(masked):
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    counts = {}
    for entry, scores, lo, hi in zip(entries, live, low.tolist(), high.tolist()):
        if lo <= hi:
            counts[entry.name] = stats.histogram(scores, low=lo, high=hi)
    if is_sharded(masked) and counts:
        summed = torch.stack([c for c, _ in counts.values()])
        dist.all_reduce(summed)
        counts = {name: (c, edges) for (name, (_, edges)), c in zip(counts.items(), summed)}
    result.update({f"masks/{name}/scores": value for name, value in counts.items()})
    return result


def repoint_folded(pl_module: pl.LightningModule, folded: Sequence[MaskedTensor]) -> None:
    """After :func:`~lightning_masks.masking.masks.fold` of sharded masks, point FSDP2 at the plain weights where the
    parametrizations held them, and stop it gathering the removed gates' tensors, so the folded model runs forward
    (evaluation, prediction) under FSDP2 as it is."""
    owners = {id(entry.weight): entry.owners for entry in folded}
    gate_tensors = {id(t) for entry in folded for t in [*entry.gate._parameters.values()] if t is not None}
    for module in pl_module.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if state is not None else None
        if group is None:
            continue
        kept = []
        for fsdp_param in group.fsdp_params:
            if id(fsdp_param.sharded_param) in gate_tensors:
                continue  # a removed gate's scores or keep bits: nothing reads them any more
            found = owners.get(id(fsdp_param.sharded_param))
            if found is not None:
                info = fsdp_param._module_info
                info.module, info.param_name = found[0]
                info.shared_modules = [m for m, _ in found[1:]]
                info.shared_param_names = [n for _, n in found[1:]]
            kept.append(fsdp_param)
        group.fsdp_params = kept


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict of a sharded model on CPU, on rank 0 (empty elsewhere): a collective call,
    every process gathers its shards to rank 0. E.g. to export the folded model from rank 0::

        state = full_state_dict(trainer.lightning_module)
        if trainer.is_global_zero:
            safetensors.torch.save_file(state, "pruned.safetensors")
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(dict[str, Tensor], state)  # a module's state dict: tensors only

