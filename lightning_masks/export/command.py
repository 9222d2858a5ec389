"""The ``lightning-masks-export`` command: fold a masked checkpoint, save it sparse, optionally shrink it.

It also re-exports the pieces (:mod:`~lightning_masks.export.checkpoints`, :mod:`~lightning_masks.export.sparse_file`,
:mod:`~lightning_masks.export.shrink`) for ``from lightning_masks.export.command import ...``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..masking.inputs import as_arguments
from ..masking.masks import fold
from .checkpoints import checkpoint_globals, fold_checkpoint, fold_state_dict, load_checkpoint
from .files import atomic_write
from .shrink import ShrinkReport, shrink
from .sparse_file import SparseFileInfo, load_sparse, save_sparse

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


def save_program(model: nn.Module, example_inputs, destination: Union[str, os.PathLike]) -> Path:
    """Save ``model`` as a ``torch.export`` program (batch size free): ``torch.export.load(path).module()`` runs it
    with no class of the model importable."""
    args, kwargs = as_arguments(example_inputs)
    batch = tuple({0: torch.export.Dim.DYNAMIC} for _ in (*args, *kwargs))  # any batch size, not just the example's
    program = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=batch)
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
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="read a checkpoint holding objects beyond tensors and plain data (unpickling them can "
                             "run code): only for a file you trust")
    return parser


def _shrink_checkpoint(args: argparse.Namespace, cls: type, output: Path) -> None:
    """Load the folded checkpoint into ``cls``, shrink it, write the program and print the savings."""
    with tempfile.TemporaryDirectory() as folder:
        folded = fold_checkpoint(args.checkpoint, Path(folder) / "folded.ckpt", trust_pickle=args.unsafe_pickle)
        with checkpoint_globals():
            model = cls.load_from_checkpoint(folded, map_location="cpu", weights_only=not args.unsafe_pickle)
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
        info = save_sparse(fold_state_dict(load_checkpoint(args.checkpoint, trust_pickle=args.unsafe_pickle)["state_dict"]),
                           output)
        print(f"wrote {info.path}: {info.sparse_bytes:,} bytes, {info.ratio:.3f} of the dense state dict "
              f"({info.dense_bytes:,} bytes); {info.sparse_tensors} tensors stored sparse")
        if args.shrink:
            _shrink_checkpoint(args, cls, output)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
