"""Turn masked models and checkpoints into plain ones."""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import safetensors.torch
import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .masks import PARAMETRIZATION_MARK, fold, masked_value, split_mask_key

__all__ = [
    "ShrinkReport",
    "SparseFileInfo",
    "fold",
    "fold_checkpoint",
    "fold_state_dict",
    "load_checkpoint",
    "load_sparse",
    "main",
    "save_program",
    "save_sparse",
    "shrink",
]

_GATE_FIELDS = ("scores", "keep", "temperature", "gate_scale")


def fold_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Return a copy of a masked state dict with every mask folded: ``<path>.<name> = w * gate * keep``.

    Raises:
        ValueError: a masked entry that misses a mask tensor, or is stacked on another parametrization.
    """
    folded: dict[str, Tensor] = {}
    masks: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        split = split_mask_key(key)
        if split is None:
            folded[key] = value
            continue
        target, field = split
        if field != "original" and field.removeprefix("0.") not in _GATE_FIELDS:
            raise ValueError(f"{key!r} belongs to a parametrization other than lightning_masks' alone; load the "
                             "checkpoint into the model with the callback and call lightning_masks.fold instead")
        masks.setdefault(target, {})[field.removeprefix("0.")] = value
    for target, parts in masks.items():
        if target.endswith("bias") and set(parts) == {"original"}:  # gated by its layer's per-channel mask
            parts = {**masks.get(target[: -len("bias")] + "weight", {}), "original": parts["original"]}
            shape = parts["original"].shape
            parts.update({k: parts[k].reshape(shape) for k in ("scores", "keep", "gate_scale")
                          if k in parts and parts[k].dim()})  # a 0-dim (per-tensor) gate_scale stays as it is
        missing = [f for f in ("original", "scores", "keep", "temperature") if f not in parts]
        if missing:
            raise ValueError(f"masked tensor {target!r} misses {missing} in the checkpoint; it is incomplete")
        folded[target] = masked_value(parts["original"], parts["scores"], parts["keep"].bool(),
                                      parts["temperature"], parts.get("gate_scale"))
    return folded


def fold_checkpoint(source: Union[str, os.PathLike], destination: Union[str, os.PathLike]) -> Path:
    """Write a copy of a masked Lightning checkpoint that ``YourModule.load_from_checkpoint`` loads.

    The model's masks are folded into plain weights with exact zeros; the optimizer and scheduler states
    (which refer to the mask scores) and this callback's state are dropped. ``destination`` is written
    atomically, so a failure leaves any existing file as it was.

    Example:
        >>> fold_checkpoint("masked.ckpt", "plain.ckpt")  # doctest: +SKIP
        >>> model = MyModule.load_from_checkpoint("plain.ckpt")  # doctest: +SKIP
    """
    checkpoint = load_checkpoint(source)
    checkpoint["state_dict"] = fold_state_dict(checkpoint["state_dict"])
    for key in ("optimizer_states", "lr_schedulers"):
        checkpoint.pop(key, None)
    callbacks = checkpoint.get("callbacks", {})
    for key in [k for k in callbacks if str(k).startswith("MaskPruningCallback")]:
        del callbacks[key]
    return atomic_write(destination, lambda path: torch.save(checkpoint, path))


def load_checkpoint(source: Union[str, os.PathLike]) -> dict:
    """Read a Lightning checkpoint onto the CPU.

    Raises:
        ValueError: the file is missing, unreadable, or holds no ``state_dict``.
    """
    source = Path(source)
    if not source.is_file():
        raise ValueError(f"checkpoint {str(source)!r} does not exist; pass the path of a .ckpt file")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:  # corrupt, truncated or not a checkpoint at all
        raise ValueError(f"could not read checkpoint {str(source)!r} ({type(error).__name__}: {error}); "
                         "pass a checkpoint file written by Lightning") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(source)!r} is not a Lightning checkpoint (no 'state_dict'); pass one written by "
                         "Trainer.save_checkpoint or ModelCheckpoint")
    return checkpoint


def atomic_write(destination: Union[str, os.PathLike], write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` and move the result onto ``destination``: all or nothing."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination


# --- sparse save -------------------------------------------------------------------------------------------------

#: Marks the keys of a tensor stored sparse: ``<name>::bits`` (packed keep bits), ``::values``, ``::shape``.
SPARSE_MARK = "::"
_BIT_ORDER = torch.arange(7, -1, -1, dtype=torch.uint8)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class SparseFileInfo:
    """What :func:`save_sparse` wrote: the file, its size and the size of ``torch.save`` of the dense dict."""

    path: Path
    sparse_bytes: int
    dense_bytes: int
    sparse_tensors: int

    @property
    def ratio(self) -> float:
        """Sparse file size over dense file size."""
        return self.sparse_bytes / self.dense_bytes


def _nonzero_bits(tensor: Tensor) -> Tensor:
    """Flat mask of the entries whose bits are not all zero (so ``-0.0`` and NaN are kept, bit-exact)."""
    flat = tensor.reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.view(_SAME_SIZE_INT[flat.element_size()])
    return flat != 0


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a flat bool tensor into uint8, eight entries a byte, most significant bit first."""
    padded = torch.zeros((mask.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask
    return (padded.view(-1, 8) << _BIT_ORDER).sum(1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` entries as a flat bool tensor."""
    return ((bits.unsqueeze(1) >> _BIT_ORDER) & 1).reshape(-1)[:count].bool()


def _encode(name: str, tensor: Tensor) -> dict[str, Tensor]:
    """Store ``tensor`` as bitmask + values when that is smaller than the dense bytes, else as it is."""
    tensor = tensor.detach().cpu()
    if tensor.is_complex() or tensor.numel() == 0:
        return {name: tensor.clone().contiguous()}
    keep = _nonzero_bits(tensor)
    sparse_bytes = (keep.numel() + 7) // 8 + int(keep.sum()) * tensor.element_size() + 8 * tensor.dim()
    if sparse_bytes >= tensor.numel() * tensor.element_size():
        return {name: tensor.clone().contiguous()}
    return {f"{name}{SPARSE_MARK}bits": pack_bits(keep), f"{name}{SPARSE_MARK}values": tensor.reshape(-1)[keep],
            f"{name}{SPARSE_MARK}shape": torch.tensor(tensor.shape, dtype=torch.int64)}


def _check_state_dict(state_dict: dict) -> None:
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; save_sparse "
                             "stores tensors only: drop that entry or save it separately")
        if SPARSE_MARK in key:
            raise ValueError(f"state dict key {key!r} contains {SPARSE_MARK!r}, which marks sparse entries; "
                             "rename the module")


def dense_size(state_dict: dict[str, Tensor]) -> int:
    """Bytes of ``torch.save(state_dict)``: the dense file a user would otherwise ship."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getbuffer().nbytes


def save_sparse(state_dict: dict[str, Tensor], destination: Union[str, os.PathLike]) -> SparseFileInfo:
    """Write a (folded) state dict as safetensors, mostly-zero tensors as a bitmask plus their nonzero values.

    The file loads back bit-exactly with :func:`load_sparse`, or in plain PyTorch with the few lines in the
    README (``safetensors`` and ``torch`` only). ``destination`` is written atomically.

    Raises:
        ValueError: an entry is not a tensor, or a key holds the reserved ``"::"``.

    Example:
        >>> info = save_sparse(fold_state_dict(checkpoint["state_dict"]), "model.safetensors")  # doctest: +SKIP
        >>> print(f"{info.ratio:.3f} of the dense file")  # doctest: +SKIP
    """
    _check_state_dict(state_dict)
    encoded: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        encoded.update(_encode(name, tensor))
    data = safetensors.torch.save(encoded, metadata={"format": "pt", "lightning_masks": "sparse/1"})
    path = atomic_write(destination, lambda temporary: Path(temporary).write_bytes(data))
    sparse_tensors = sum(key.endswith(f"{SPARSE_MARK}bits") for key in encoded)
    return SparseFileInfo(path, len(data), dense_size(state_dict), sparse_tensors)


def load_sparse(source: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` back into the exact dense state dict.

    Raises:
        ValueError: the file is missing or is not a safetensors file.
    """
    source = Path(source)
    if not source.is_file():
        raise ValueError(f"sparse file {str(source)!r} does not exist; pass a file written by save_sparse")
    try:
        flat = safetensors.torch.load_file(source)
    except Exception as error:
        raise ValueError(f"could not read sparse file {str(source)!r} ({type(error).__name__}: {error}); pass a "
                         "file written by save_sparse or lightning-masks-export") from error
    state: dict[str, Tensor] = {}
    for key, tensor in flat.items():
        name, _, part = key.partition(SPARSE_MARK)
        if not part:
            state[name] = tensor
        elif part == "values":
            shape = flat[f"{name}{SPARSE_MARK}shape"].tolist()
            keep = unpack_bits(flat[f"{name}{SPARSE_MARK}bits"], math.prod(shape))
            dense = torch.zeros(keep.numel(), dtype=tensor.dtype)
            dense[keep] = tensor
            state[name] = dense.reshape(shape)
    return state


# --- physical shrink ---------------------------------------------------------------------------------------------

_PRUNED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASSED_THROUGH = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._SliceOp,
                   nn.modules.batchnorm._BatchNorm)


@dataclass
class ShrinkReport:
    """What :func:`shrink` did, per layer name: channels removed, of those folded into a bias, and kept;
    ``silenced`` counts the channels zeroed because the BatchNorm after them has zero scale and shift."""

    params_before: int
    params_after: int
    removed: dict[str, int] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    silenced: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Fold:
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


def _call(model: nn.Module, example_inputs) -> object:
    return model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)


@torch.no_grad()
def _layer_inputs(model: nn.Module, example_inputs) -> dict[nn.Module, Tensor]:
    """Each prunable layer's input on ``example_inputs``, as ``(features or channels, samples)``."""
    seen: dict[nn.Module, Tensor] = {}

    def record(layer, args):
        x = args[0]
        seen[layer] = x.reshape(-1, x.shape[-1]).T if isinstance(layer, nn.Linear) else x.transpose(0, 1).flatten(1)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if _prunable(m)]
    try:
        _call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _plan_channel(graph, layer: nn.Module, channel: int, inputs: dict[nn.Module, Tensor]) -> Union[list[_Fold], str]:
    """The bias folds that make removing ``channel`` of ``layer`` exact, or why it cannot be removed."""
    folds: list[_Fold] = []
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
                    return "constant output read by a zero-padded conv: not foldable into its bias"
                folds.append(_Fold(module, idxs, rows[:, 0].clone()))
        elif not isinstance(module, _PASSED_THROUGH):
            return f"reaches a {type(module).__name__} that shrink does not handle"
    return folds if consumers else "feeds the model output"


@torch.no_grad()
def _apply_fold(fold_: _Fold) -> None:
    """Add the constant inputs' contribution to the layer's bias (created when the layer has none)."""
    layer = fold_.layer
    weight = layer.weight.detach()[:, fold_.idxs]
    if weight.dim() > 2:  # a conv without zero padding sees the constant at every tap of the kernel
        weight = weight.flatten(2).sum(2)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    layer.bias += weight @ fold_.values.to(weight.dtype)


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
    """Remove the removable zero output channels of one layer, folding constants into biases first.

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
        for fold_ in plans[c]:
            _apply_fold(fold_)
    group = graph.get_pruning_group(layer, _out_pruner(layer), idxs=removable)
    readers = [(item.dep.target.module, [int(i) for i in item.idxs]) for item in group
               if getattr(item.dep.handler, "__name__", "") == "prune_in_channels" and item.dep.target.module in inputs]
    group.prune()
    for reader, idxs in readers:
        kept = torch.ones(len(inputs[reader]), dtype=torch.bool)
        kept[idxs] = False
        inputs[reader] = inputs[reader][kept]
    report.removed[name] = len(removable)
    report.folded[name] = sum(bool(plans[c]) for c in removable)


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
        expected = _call(small, example_inputs)
    report = ShrinkReport(_count_parameters(small), 0)
    graph = tp.DependencyGraph().build_dependency(small, example_inputs=example_inputs)
    _silence_dead_norms(graph, small, report)
    inputs = _layer_inputs(small, example_inputs)
    for name, layer in list(small.named_modules()):
        if _prunable(layer):
            _shrink_layer(graph, name, layer, inputs, report)
    with torch.no_grad():
        difference = _max_difference(expected, _call(small, example_inputs))
    scale = max(float(t.abs().max()) for t in tree_leaves(expected) if t.numel())
    if difference > atol + rtol * scale:
        raise ValueError(f"shrinking changed the outputs by up to {difference:.3g} (scale {scale:.3g}), so a "
                         "dependency was not followed; the model is left as it was: export it unshrunk")
    report.params_after = _count_parameters(small)
    return small, report


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_program(model: nn.Module, example_inputs, destination: Union[str, os.PathLike]) -> Path:
    """Save ``model`` as a ``torch.export`` program (batch size free): ``torch.export.load(path).module()`` runs it
    with no class of the model importable."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    batch = tuple({0: torch.export.Dim.DYNAMIC} for _ in args)  # any batch size, not just the example's
    program = torch.export.export(model.eval(), args, dynamic_shapes=batch)
    return atomic_write(destination, lambda temporary: torch.export.save(program, temporary))


# --- the command -------------------------------------------------------------------------------------------------

def _module_class(spec: str) -> type:
    """Import ``pkg.mod:ClassName`` and check it can ``load_from_checkpoint``."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"--module-class {spec!r} is not of the form pkg.module:ClassName, e.g. "
                         "lightning_masks.zoo:LeNet5")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--module-class {spec!r} could not be imported ({error}); check the module path and "
                         "that the package is installed") from error
    if not hasattr(cls, "load_from_checkpoint"):
        raise ValueError(f"--module-class {spec!r} has no load_from_checkpoint; pass a LightningModule subclass")
    return cls


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; give positive integers separated by commas, "
                                         "batch first, e.g. 8,1,28,28")
    return shape


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-masks-export",
        description="Fold a masked Lightning checkpoint, save it sparse, and optionally remove its zero channels.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written during or after masked training")
    parser.add_argument("-o", "--output", type=Path, help="sparse file to write (default: CHECKPOINT.safetensors)")
    parser.add_argument("--shrink", action="store_true",
                        help="also remove exactly-zero channels and write OUTPUT.pt2 (a torch.export program)")
    parser.add_argument("--module-class", metavar="PKG.MOD:CLASS",
                        help="the LightningModule class of the checkpoint (needed by --shrink)")
    parser.add_argument("--input-shape", type=_input_shape, metavar="B,C,H,W",
                        help="shape of an example batch of random inputs (needed by --shrink), e.g. 8,1,28,28")
    return parser


def _shrink_checkpoint(args: argparse.Namespace, cls: type, output: Path) -> None:
    """Load the folded checkpoint into ``cls``, shrink it, write the program and print the savings."""
    with tempfile.TemporaryDirectory() as folder:
        model = cls.load_from_checkpoint(fold_checkpoint(args.checkpoint, Path(folder) / "folded.ckpt"),
                                         map_location="cpu")
    example = torch.randn(*args.input_shape, generator=torch.Generator().manual_seed(0))
    small, report = shrink(model, example)
    program = save_program(small, example, output.with_suffix(".pt2"))
    print(f"wrote {program}: {report.params_after:,} of {report.params_before:,} parameters "
          f"({report.params_after / report.params_before:.3f}), {sum(report.removed.values())} channels removed")
    for name, reason in report.skipped.items():
        print(f"  kept {name}: {reason}")


def main(argv: Optional[list[str]] = None) -> None:
    """The ``lightning-masks-export`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.shrink and (args.module_class is None or args.input_shape is None):
        parser.error("--shrink needs --module-class pkg.mod:ClassName and --input-shape B,C,H,W")
    output = args.output or args.checkpoint.with_suffix(".safetensors")
    try:
        cls = _module_class(args.module_class) if args.shrink else None  # fail before writing anything
        info = save_sparse(fold_state_dict(load_checkpoint(args.checkpoint)["state_dict"]), output)
        print(f"wrote {info.path}: {info.sparse_bytes:,} bytes, {info.ratio:.3f} of the dense state dict "
              f"({info.dense_bytes:,} bytes); {info.sparse_tensors} tensors stored sparse")
        if args.shrink:
            _shrink_checkpoint(args, cls, output)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
