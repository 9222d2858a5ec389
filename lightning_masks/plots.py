"""The PNG pictures: per-layer sparsity over training, gate histograms (and the sweep plot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["gate_histograms", "sparsity_heatmap"]


def sparsity_heatmap(layers: Sequence[str], history: Sequence[Sequence[float]], positions: Sequence[float],
                     path: Path, unit: str = "epoch") -> Path:
    """Write a layers x updates heatmap of per-layer sparsity; ``history[i][j]`` is layer j at update i."""
    data = np.asarray(history, dtype=float).T if len(history) else np.zeros((len(layers), 0))
    figure, axes = plt.subplots(figsize=(max(4.0, 0.5 * data.shape[1] + 3), max(2.0, 0.35 * len(layers) + 1.2)))
    image = axes.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_yticks(range(len(layers)), labels=layers, fontsize=8)
    step = max(1, len(positions) // 12)
    axes.set_xticks(range(0, len(positions), step), labels=[f"{p:g}" for p in positions[::step]], fontsize=8)
    axes.set_xlabel(f"mask update ({unit})")
    axes.set_title("sparsity per layer")
    figure.colorbar(image, ax=axes, label="sparsity")
    return _save(figure, path)


def gate_histograms(histograms: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Write one small bar chart per layer of ``name -> (counts, edges)`` gate histograms."""
    count = max(len(histograms), 1)
    columns = min(count, 3)
    rows = -(-count // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    for axes, (name, (counts, edges)) in zip(grid.flat, histograms.items()):
        counts, edges = np.asarray(counts), np.asarray(edges)
        axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("gate (kept entries)", fontsize=8)
    for axes in list(grid.flat)[len(histograms):]:
        axes.axis("off")
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
