"""N:M masks learned as a choice among each group's patterns: MaskLLM's Gumbel-softmax relaxation.

MaskLLM (Fang et al. 2024, https://arxiv.org/abs/2409.17481; NVlabs/MaskLLM ``differentiable_mask.py``) treats the
mask of each group of M weights as a categorical choice among its ``C(M, N)`` N:M patterns (six for 2:4). In
training the network computes ``w * m``, with ``m = y @ patterns`` the mixture of patterns weighted by a
Gumbel-softmax sample ``y = softmax((scale * logits + g) / tau)``, ``g ~ Gumbel(0, 1)`` and ``tau`` annealed towards
a hard choice; in evaluation and once folded, the most probable pattern. Here a pattern's logit is the sum of its
kept entries' scores (the scores keep the weight's shape), so the most probable pattern is each group's N highest
scores: the callback's N:M selection over the learned scores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .._checks import check_flags, check_number

__all__ = ["GumbelPatterns", "RelaxedGroups", "relaxed_keep"]


@dataclass(frozen=True)
class GumbelPatterns:
    """Learn each group's N:M pattern through a Gumbel-softmax over its ``C(M, N)`` patterns (MaskLLM).

    Pass it as ``Selector(granularity="2:4", relaxation=GumbelPatterns())``. The masks are binary (``w * keep``
    outside training, and once folded); the scores are standardised per tensor (zero mean, unit std) when they are
    initialised, so ``scale`` sets how strongly the initial scores (the prior: magnitude, Wanda, a one-shot mask
    with ``init="from_zeros"``) favour their own pattern against the Gumbel noise.

    Args:
        temperature: ``(start, end)`` of the Gumbel-softmax temperature ``tau``, annealed linearly over the fit's
            optimizer steps (MaskLLM: 4 to 0.1); lower is a harder sample.
        scale: ``kappa``, multiplies the pattern logits (MaskLLM's ``scale_multiplier``): a pattern's logit is
            ``scale * sum of its kept entries' standardised scores``.
        hard: the forward takes the sampled pattern itself (one-hot), the scores' gradient that of the soft sample
            (straight-through Gumbel-softmax, ``torch.nn.functional.gumbel_softmax(hard=True)``; MaskLLM's
            ``hard``): the weights train under whole N:M patterns.

    Raises:
        ValueError: a temperature that is not two numbers > 0, or a scale that is not a number > 0.
    """

    temperature: Sequence[float] = (4.0, 0.1)
    scale: float = 10.0
    hard: bool = False

    def __post_init__(self) -> None:
        pair = self.temperature
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"temperature must be (start, end), two numbers > 0, got {pair!r}; e.g. (4.0, 0.1)")
        for name, value in zip(("temperature[0]", "temperature[1]"), pair):
            check_number(name, value, 0.0, math.inf, low_open=True, hint="MaskLLM anneals from 4.0 to 0.1")
        check_number("scale", self.scale, 0.0, math.inf, low_open=True, hint="try 10.0")
        check_flags(hard=self.hard)
        object.__setattr__(self, "temperature", (float(pair[0]), float(pair[1])))
        object.__setattr__(self, "scale", float(self.scale))

    def tau(self, progress: float) -> float:
        """The temperature at ``progress`` (the fraction of the fit's steps done, clipped to [0, 1])."""
        start, end = self.temperature
        return start + (end - start) * min(max(progress, 0.0), 1.0)


@lru_cache(maxsize=None)
def _patterns(n: int, m: int) -> Tensor:
    """The ``C(m, n)`` N:M patterns of a group, a ``(C(m, n), m)`` float32 tensor of 0/1 (CPU; moved per use)."""
    rows = [[1.0 if i in kept else 0.0 for i in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


def relaxed_keep(scores: Tensor, n: int, m: int, axis: int, tau: float, scale: float, *, noise: bool = True,
                 hard: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """The soft keep mask ``y @ patterns`` of a Gumbel-softmax sample over each group's N:M patterns.

    Args:
        scores: the scores, the weight's shape; groups of ``m`` run along the axes other than ``axis`` (the output
            axis), as the N:M selection takes them.
        n, m: keep ``n`` of every ``m``.
        axis: the output axis.
        tau: the Gumbel-softmax temperature (> 0).
        scale: multiplies the pattern logits (each the sum of the pattern's kept scores).
        noise: add ``Gumbel(0, 1)`` noise (a sample); off, the softmax of the logits themselves.
        hard: the sampled pattern itself (0/1), with the soft sample's gradient (straight-through).
        generator: draws the noise (on the scores' device); ``None``: torch's global generator.

    Returns:
        float32, the scores' shape: each entry's weight in the sampled mixture of patterns, in [0, 1]; each
        group's entries sum to ``n``. Differentiable in ``scores``.
    """
    rows = scores.movedim(axis, 0)
    table = _patterns(n, m).to(scores.device)
    logits = (rows.reshape(-1, m).float() @ table.T) * scale
    if noise:
        logits = logits - torch.empty_like(logits).exponential_(generator=generator).log()  # + Gumbel(0, 1)
    sample = torch.softmax(logits / tau, dim=-1)
    if hard:
        chosen = torch.zeros_like(sample).scatter_(-1, sample.argmax(-1, keepdim=True), 1.0)
        sample = chosen + (sample - sample.detach())  # the values chosen's, the gradient the soft sample's
    mixture = sample @ table
    return mixture.reshape(rows.shape).movedim(0, axis)


class RelaxedGroups:
    """A gate's relaxation: its N:M groups (``n`` of ``m`` along the axes other than ``axis``), the settings, the
    current temperature ``tau`` (set by the callback as the fit goes on) and the ``generator`` of its noise (``None``:
    torch's global one; the callback's, saved in its checkpoints, so that a resumed fit draws what the uninterrupted
    one would)."""

    def __init__(self, patterns: GumbelPatterns, n: int, m: int, axis: int,
                 generator: torch.Generator | None = None) -> None:
        self.patterns, self.n, self.m, self.axis, self.generator = patterns, n, m, axis, generator
        self.tau = patterns.tau(0.0)

    def keep(self, scores: Tensor) -> Tensor:
        """A sampled soft keep mask of ``scores``' shape (see :func:`relaxed_keep`)."""
        return relaxed_keep(scores, self.n, self.m, self.axis, self.tau, self.patterns.scale, hard=self.patterns.hard,
                            generator=self.generator)

    def __repr__(self) -> str:
        return f"RelaxedGroups({self.n}:{self.m}, axis={self.axis}, tau={self.tau:g}, scale={self.patterns.scale:g})"
