"""Figures without pyplot: a figure of its own, drawn by Agg when saved, so the user's backend is left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._extras import extra

with extra("plots"):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["legend", "save", "subplots"]


def legend(axes: Axes, title: str, below: bool) -> None:
    """A legend inside the axes, or below them when its names are long (so it covers no data)."""
    if below:
        axes.legend(title=title, fontsize="x-small", title_fontsize="small", loc="upper center",
                    bbox_to_anchor=(0.5, -0.16), ncol=1)
    else:
        axes.legend(title=title, fontsize="small")


def subplots(*grid: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a figure of its own, drawn by Agg when saved."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, squeeze=squeeze)


def save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
