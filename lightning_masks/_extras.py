"""Optional dependencies: ``with extra("export"): import torch_pruning`` turns a missing package into an error that
names the extra installing it. The callback itself needs only torch and lightning."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["extra"]

#: what each extra of ``pip install "lightning-masks[...]"`` is for (the packages are in pyproject.toml)
EXTRAS = {
    "app": "the Hydra app (lightning-masks-train, lightning-masks-report) and the zoo's data sets",
    "export": "sparse files (safetensors), shrink and tie='auto' (Torch-Pruning)",
    "plots": "the fit's pictures (matplotlib)",
}


@contextmanager
def extra(name: str) -> Iterator[None]:
    """Run the imports of an optional feature; a missing package raises an ``ImportError`` naming ``name``'s extra.

    Raises:
        ImportError: a package imported inside the block is not installed (chained to the original error).
        ValueError: ``name`` is not one of :data:`EXTRAS`.
    """
    if name not in EXTRAS:
        raise ValueError(f"unknown extra {name!r}; the extras are {sorted(EXTRAS)}")
    try:
        yield
    except ImportError as error:
        raise ImportError(f"{error.name or error} is not installed; it is needed by {EXTRAS[name]}: "
                          f"pip install 'lightning-masks[{name}]'") from error
