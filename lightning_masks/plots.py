"""The PNG pictures: per-layer sparsity over training, gate histograms (and the sweep plot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["gate_histograms", "plot_sweep", "sparsity_heatmap"]


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


def _by_series(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(str(row.get(key) or "?"), []).append(row)
    return series


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, *, title: Optional[str] = None,
               x: str = "sparsity", y: str = "test_acc", series: str = "init", noise: str = "noise_scale") -> Path:
    """Plot accuracy against sparsity, one series per init strategy, and save a PNG at ``path``.

    When ``noise`` varies among the rows whose initializer uses it (``noise_used``), a second panel plots
    accuracy against it (log scale); initializers without noise appear there as dashed lines at their mean.
    Rows whose ``status`` is not ``ok`` are left out of the picture and counted in its caption.

    Args:
        rows: one dict per job, with at least ``status``, ``x``, ``y`` and ``series``.
        path: where to write the PNG.
        title: the figure's title.
        x, y, series, noise: the keys to plot.
    """
    done = [row for row in rows if row.get("status") == "ok" and row.get(x) is not None and row.get(y) is not None]
    noisy = [row for row in done if row.get("noise_used") and row.get(noise) is not None]
    show_noise = len({row[noise] for row in noisy}) > 1
    figure, axes = plt.subplots(1, 2 if show_noise else 1, figsize=(10 if show_noise else 5.5, 4), squeeze=False)
    names = sorted(_by_series(done, series))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    markers = {name: "os^Dvp*"[i % 7] for i, name in enumerate(names)}

    left = axes[0][0]
    for name, members in sorted(_by_series(done, series).items()):
        members = sorted(members, key=lambda row: row[x])
        style = "-" if len({row[x] for row in members}) > 1 else ""  # a line only along varying sparsity
        left.plot([row[x] for row in members], [row[y] for row in members], markers[name] + style,
                  color=colors[name], label=name, alpha=0.7, markersize=8)
    left.set(xlabel=f"final {x}", ylabel=y, title=f"{y} vs final {x}")
    left.grid(alpha=0.3)
    if done:
        left.legend(title=series, fontsize="small")

    if show_noise:
        right = axes[0][1]
        for name, members in sorted(_by_series(noisy, series).items()):
            members = sorted(members, key=lambda row: row[noise])
            right.plot([row[noise] for row in members], [row[y] for row in members], markers[name] + "-",
                       color=colors[name], label=name)
        for name, members in sorted(_by_series([r for r in done if not r.get("noise_used")], series).items()):
            mean = sum(row[y] for row in members) / len(members)
            right.axhline(mean, linestyle="--", color=colors[name], label=f"{name} (no noise)")
        right.set_xscale("log")
        right.set(xlabel=noise, ylabel=y, title=f"{y} vs {noise}")
        right.grid(alpha=0.3)
        right.legend(title=series, fontsize="small")

    left_out = len(rows) - len(done)
    caption = f"{len(done)} of {len(rows)} jobs plotted" + (f"; {left_out} failed, missing or without result"
                                                             if left_out else "")
    figure.suptitle(f"{title}\n{caption}" if title else caption, fontsize="medium")
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
