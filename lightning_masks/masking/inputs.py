"""Example inputs as Lightning's ``example_input_array`` holds them: a tuple or list is the positional inputs, a
dict (a mapping) the keyword inputs, anything else the one input. Every place that runs a model on an example
input (tracing the output layers, shrinking, exporting) reads it here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["as_arguments", "call_with"]


def as_arguments(example: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call on ``example``.

    >>> as_arguments((1, 2)), as_arguments({"x": 1}), as_arguments(3)
    (((1, 2), {}), ((), {'x': 1}), ((3,), {}))
    """
    if isinstance(example, Mapping):
        return (), dict(example)
    return (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {}


def call_with(model: nn.Module, example: Any) -> Any:
    """``model`` called on ``example`` as Lightning calls it (see :func:`as_arguments`)."""
    args, kwargs = as_arguments(example)
    return model(*args, **kwargs)
