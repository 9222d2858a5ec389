"""Exact zeros of a plain (folded) model, counted by the package's own
:func:`lightning_masks.masking.stats.zero_rows`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.utils import parametrize

from lightning_masks.masking.stats import zero_rows

__all__ = ["zeros_and_total"]


def zeros_and_total(model: nn.Module, targets: Sequence = (nn.Linear, nn.Conv2d)) -> tuple[int, int]:
    """``(zeros, total)`` over the tensors ``targets`` selects (module types or name globs, as the callback's
    ``targets``): by default the weights of every ``Linear`` and ``Conv2d``.

    The model must be plain: ``zero_rows`` skips masked tensors, so a parametrized model would be undercounted.
    """
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    rows = zero_rows(model, list(targets))
    total = sum(row["total"] for row in rows)
    return total - sum(row["kept"] for row in rows), total
