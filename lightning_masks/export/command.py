"""The ``lightning-masks-export`` command: fold a masked checkpoint, save it sparse, optionally shrink it (the pieces
are :mod:`~lightning_masks.export.checkpoints`, :mod:`~lightning_masks.export.sparse_file` and
:mod:`~lightning_masks.export.shrink`; :mod:`lightning_masks.export` is their face)."""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..masking import as_arguments
from .checkpoints import checkpoint_globals, fold_checkpoint, fold_state_dict, load_checkpoint
from .files import atomic_write
from .shrink import ShrinkReport, shrink
from .sparse_file import save_sparse

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py


def _export_program(model: nn.Module, example_inputs) -> torch.export.ExportedProgram:
    """``model`` as a ``torch.export`` program whose batch size is free (not just the example's)."""
    args, kwargs = as_arguments(example_inputs)
    batch = tuple({0: torch.export.Dim.DYNAMIC} for _ in (*args, *kwargs))
    return torch.export.export(model.eval(), args, kwargs, dynamic_shapes=batch)


def save_program(model: nn.Module, example_inputs, destination: Union[str, os.PathLike]) -> Path:
    """Save ``model`` as a ``torch.export`` program (batch size free): ``torch.export.load(path).module()`` runs it
    with no class of the model importable."""
    program = _export_program(model, example_inputs)
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
    parser.add_argument("--input-dtype", choices=sorted(_INPUT_DTYPES), default="float",
                        help="dtype of the example inputs: float (Gaussian noise) or long (token ids, uniform in "
                             "[0, --input-high))")
    parser.add_argument("--input-high", type=int, metavar="N",
                        help="with --input-dtype long, one more than the largest token id (default: the model's "
                             "config.vocab_size, or its first embedding's size)")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="read a checkpoint holding objects beyond tensors and plain data (unpickling them can "
                             "run code): only for a file you trust")
    return parser


_INPUT_DTYPES = {"float": torch.float32, "long": torch.int64}


def _vocabulary(model: nn.Module) -> Optional[int]:
    """The number of token ids ``model`` takes: a ``config.vocab_size`` (transformers) or its first embedding's."""
    for module in model.modules():
        size = getattr(getattr(module, "config", None), "vocab_size", None)
        if isinstance(size, int):
            return size
    return next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _example(args: argparse.Namespace, model: nn.Module) -> torch.Tensor:
    """The example batch of ``--input-shape``: Gaussian noise, or token ids below ``--input-high``."""
    generator = torch.Generator().manual_seed(0)
    if args.input_dtype == "float":
        return torch.randn(*args.input_shape, generator=generator)
    high = args.input_high or _vocabulary(model)
    if not high or high < 1:
        raise ValueError(f"--input-dtype long needs --input-high N (token ids in [0, N)); {type(model).__name__} has "
                         "no config.vocab_size or embedding to take it from")
    return torch.randint(0, high, args.input_shape, generator=generator)


def _shrunk_program(args: argparse.Namespace, cls: type) -> tuple[torch.export.ExportedProgram, ShrinkReport]:
    """Load the folded checkpoint into ``cls``, shrink it and export it, writing nothing."""
    with tempfile.TemporaryDirectory() as folder:
        folded = fold_checkpoint(args.checkpoint, Path(folder) / "folded.ckpt", trust_pickle=args.unsafe_pickle)
        with checkpoint_globals():
            load = getattr(cls, "load_from_checkpoint")  # checked by _module_class (export/ imports no lightning)
            model = load(folded, map_location="cpu", weights_only=not args.unsafe_pickle)
    example = _example(args, model)
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as error:
        raise ValueError(f"{cls.__name__} does not run on --input-shape {','.join(map(str, args.input_shape))} "
                         f"--input-dtype {args.input_dtype} ({type(error).__name__}: {str(error).splitlines()[0]}); "
                         "give the shape and dtype it takes (token ids: --input-dtype long)") from error
    small, report = shrink(model, example)
    try:
        return _export_program(small, example), report
    except Exception as error:
        raise ValueError(f"torch.export could not export the shrunk {type(model).__name__} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); export it without --shrink") from error


def main(argv: Optional[list[str]] = None) -> None:
    """The ``lightning-masks-export`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.shrink and (args.module_class is None or args.input_shape is None):
        parser.error("--shrink needs --module-class pkg.mod:ClassName and --input-shape B,C,H,W")
    output = args.output or args.checkpoint.with_suffix(".safetensors")
    try:
        state = fold_state_dict(load_checkpoint(args.checkpoint, trust_pickle=args.unsafe_pickle)["state_dict"])
        shrunk = _shrunk_program(args, _module_class(args.module_class)) if args.shrink else None  # before writing
        info = save_sparse(state, output)
        print(f"wrote {info.path}: {info.sparse_bytes:,} bytes, {info.ratio:.3f} of the dense state dict "
              f"({info.dense_bytes:,} bytes); {info.sparse_tensors} tensors stored sparse")
        if shrunk is not None:
            program, report = shrunk
            path = atomic_write(output.with_suffix(".pt2"), lambda temporary: torch.export.save(program, temporary))
            print(f"wrote {path}: {report.params_after:,} of {report.params_before:,} parameters "
                  f"({report.params_after / report.params_before:.3f}), {sum(report.removed.values())} channels "
                  "removed")
            for name, reason in report.skipped.items():
                print(f"  kept {name}: {reason}")
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
