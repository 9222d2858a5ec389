"""MaskState: how each mask's gate is computed and how its state is held (the settings :func:`attach` applies)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .._checks import check_flags, check_number
from .gate import SCORE_DTYPES

__all__ = ["MaskState"]


def _score_dtype(spec: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``score_dtype`` as a ``torch.dtype`` (or ``None``); raises ``ValueError`` naming the allowed values."""
    allowed = {str(d).removeprefix("torch."): d for d in SCORE_DTYPES}
    dtype = allowed.get(spec.removeprefix("torch."), spec) if isinstance(spec, str) else spec
    if dtype is not None and dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {sorted(allowed)}, a torch.dtype among them, or None (the "
                         f"weight's dtype), got {spec!r}")
    return dtype


@dataclass(frozen=True)
class MaskState:
    """The gate ``sigmoid(scores / T)`` of every mask, and the dtype and layout of its state.

    Args:
        temperature: the gate's ``T > 0`` (lower is a harder gate).
        rescale_gate: divide each gate by its initial value so training starts from the dense function
            (on by default: benchmarks/results/study_lenet300_s99.md); with ``compact``, by one scalar per tensor,
            ``1 / mean(sigmoid(scores / T))`` over the kept entries (Continuous Sparsification, Savarese et al. 2020,
            https://arxiv.org/abs/1912.04427, divides the same way).
        score_dtype: the dtype of the scores, hence of their gradient and optimizer state: ``"bfloat16"`` (the
            default), ``"float32"``, ``"float64"`` (with or without ``torch.``) or a ``torch.dtype``; ``None`` takes
            the weight's. Never wider than the weight; the gate is computed in the weight's dtype. Held as a
            ``torch.dtype`` (or ``None``).
        compact: one rescale scalar per tensor instead of a float per weight. With ``score_dtype="bfloat16"``
            and Adam a masked weight then carries 8.125 bytes of mask state (scores, their gradient, two Adam
            moments, and the keep bits packed eight a byte) instead of 20.125. The keep bits are held apart from
            the scores in an integer buffer, whatever this says: clamps, casts and weight decay of the parameters
            leave pruned entries pruned.

    Raises:
        ValueError: a temperature that is not a number > 0, a flag that is not a bool, or an unknown score dtype.

    Example:
        >>> MaskState(score_dtype="float32", compact=False).score_dtype
        torch.float32
    """

    temperature: float = 1.0
    rescale_gate: bool = True
    score_dtype: Union[str, torch.dtype, None] = "bfloat16"
    compact: bool = True

    def __post_init__(self) -> None:
        check_number("temperature", self.temperature, 0.0, math.inf, low_open=True,
                     hint="try 1.0 (lower is a harder gate)")
        check_flags(rescale_gate=self.rescale_gate, compact=self.compact)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "score_dtype", _score_dtype(self.score_dtype))
