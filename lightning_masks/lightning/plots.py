"""The fit's PNG pictures: per-layer sparsity over training, gate histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .._figures import save, subplots

__all__: list[str] = []  # the layer's own: its face is the folder's __init__.py


#: Bounds of :func:`sparsity_over_training`'s picture, in inches at the saved 100 dpi (1000 x 700 pixels at most).
MAX_FIGSIZE = (10.0, 7.0)
#: Up to this many layers are drawn as one line each; more are drawn as a heatmap (layers x training position).
_MAX_LINES = 12


def sparsity_over_training(layers: Sequence[str], history: Sequence[Sequence[float]], positions: Sequence[float],
                           path: Path, unit: str = "epoch") -> Path:
    """Write a PNG of each layer's sparsity over training, readable at any number of updates and layers.

    Up to :data:`_MAX_LINES` layers: one step line per layer (sparsity holds between two updates) against the
    update's position, legend outside the axes. More layers: a heatmap, layers (rows, first layer on top)
    against the position in training, with at most ~40 labelled rows. Either way the figure is at most
    :data:`MAX_FIGSIZE` (1000 x 700 pixels), whatever the number of updates.

    Args:
        layers: the masked tensors' names, ``L`` of them.
        history: ``history[i][j]`` is layer ``j``'s sparsity (a fraction in [0, 1]) after update ``i``; ``U`` rows.
        positions: the ``U`` updates' positions in training (epoch index or optimizer step).
        path: where to write the PNG.
        unit: what ``positions`` count (``"epoch"`` or ``"step"``), for the x axis label.

    Raises:
        ValueError: ``history`` and ``positions`` of different lengths, or a row of ``history`` not ``L`` long.
    """
    data = np.asarray(history, dtype=float).reshape(len(history), -1) if len(history) else np.zeros((0, len(layers)))
    if len(history) != len(positions) or data.shape[1] != len(layers):
        raise ValueError(f"history is {data.shape[0]} updates x {data.shape[1]} layers, positions {len(positions)} "
                         f"long, layers {len(layers)}: need updates x layers with one position per update")
    x = np.asarray(positions, dtype=float)
    xlabel = f"training position of the mask update ({unit})"
    if len(layers) <= _MAX_LINES:
        figure, axes = subplots(figsize=(8.0, 4.0))
        for j, name in enumerate(layers):
            axes.plot(x, 100 * data[:, j], drawstyle="steps-post", marker="." if len(x) <= 30 else None,
                      color=f"C{j % 10}", linestyle="-" if j < 10 else "--", label=name)
        axes.set_ylim(-2, 102)
        axes.set_ylabel("sparsity of the layer (%)")
        axes.grid(alpha=0.3)
        if layers:
            axes.legend(title="layer", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        height = min(MAX_FIGSIZE[1], 1.8 + 0.12 * len(layers))
        figure, axes = subplots(figsize=(MAX_FIGSIZE[0] * 0.85, height))
        if len(x):  # cell edges: each update's value holds until the next update
            edges = np.append(x, x[-1] + (x[-1] - x[-2] if len(x) > 1 else 1.0))
            image = axes.pcolormesh(edges, np.arange(len(layers) + 1), data.T, cmap="viridis", vmin=0.0, vmax=1.0,
                                    shading="flat")
            figure.colorbar(image, ax=axes, label="sparsity of the layer")
        axes.set_ylim(len(layers), 0)
        every = -(-len(layers) // 40)
        axes.set_yticks(np.arange(0, len(layers), every) + 0.5, labels=list(layers)[::every],
                        fontsize=6 if len(layers) > 20 else 8)
        axes.set_ylabel(f"layer ({len(layers)}; every {every}{'st' if every == 1 else 'th'} named)"
                        if every > 1 else "layer")
    axes.set_xlabel(xlabel)
    axes.set_title(f"sparsity per layer over training ({len(x)} mask updates)")
    figure.set_size_inches(min(figure.get_figwidth(), MAX_FIGSIZE[0]), min(figure.get_figheight(), MAX_FIGSIZE[1]))
    return save(figure, path)


def gate_histograms(histograms: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Write one small bar chart per layer of ``name -> (counts, edges)`` gate histograms."""
    count = max(len(histograms), 1)
    columns = min(count, 3)
    rows = -(-count // columns)
    figure, grid = subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    for axes, (name, (counts, edges)) in zip(grid.flat, histograms.items()):
        counts, edges = np.asarray(counts), np.asarray(edges)
        axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("gate (kept entries)", fontsize=8)
    for axes in list(grid.flat)[len(histograms):]:
        axes.axis("off")
    return save(figure, path)
