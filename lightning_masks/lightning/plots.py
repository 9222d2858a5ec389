"""The PNG pictures: per-layer sparsity over training, gate histograms (and the sweep plot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np  # noqa: E402
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # the object API: no pyplot, so the user's plotting backend is left alone

__all__ = ["MAX_FIGSIZE", "MAX_LINES", "gate_histograms", "plot_sweep", "sparsity_over_training"]


#: Bounds of :func:`sparsity_over_training`'s picture, in inches at the saved 100 dpi (1000 x 700 pixels at most).
MAX_FIGSIZE = (10.0, 7.0)
#: Up to this many layers are drawn as one line each; more are drawn as a heatmap (layers x training position).
MAX_LINES = 12


def sparsity_over_training(layers: Sequence[str], history: Sequence[Sequence[float]], positions: Sequence[float],
                           path: Path, unit: str = "epoch") -> Path:
    """Write a PNG of each layer's sparsity over training, readable at any number of updates and layers.

    Up to :data:`MAX_LINES` layers: one step line per layer (sparsity holds between two updates) against the
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
    if len(layers) <= MAX_LINES:
        figure, axes = _subplots(figsize=(8.0, 4.0))
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
        figure, axes = _subplots(figsize=(MAX_FIGSIZE[0] * 0.85, height))
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
    return _save(figure, path)


def gate_histograms(histograms: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Write one small bar chart per layer of ``name -> (counts, edges)`` gate histograms."""
    count = max(len(histograms), 1)
    columns = min(count, 3)
    rows = -(-count // columns)
    figure, grid = _subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
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

    Rows may be jobs or configurations (jobs grouped over seeds): a row with ``<y>_std`` is drawn with a ±1 std
    error bar, and its ``seeds`` count is shown in the legend. When ``noise`` varies among the rows whose
    initializer uses it (``noise_used``), a second panel plots accuracy against it (log scale); initializers
    without noise appear there as dashed lines at their mean. Rows whose ``status`` is present and not ``ok``
    are left out of the picture and counted in its caption.

    Args:
        rows: one dict per job or configuration, with at least ``x``, ``y`` and ``series``.
        path: where to write the PNG.
        title: the figure's title.
        x, y, series, noise: the keys to plot.
    """
    done = [row for row in rows if row.get("status", "ok") == "ok" and row.get(x) is not None
            and row.get(y) is not None]
    noisy = [row for row in done if row.get("noise_used") and row.get(noise) is not None]
    show_noise = len({row[noise] for row in noisy}) > 1
    names = sorted(_by_series(done, series))
    long_names = max((len(name) for name in names), default=0) > 12
    height = 4.0 + (0.22 * -(-len(names) // 2) + 0.6 if long_names else 0.0)  # room for a legend below
    figure, axes = _subplots(1, 2 if show_noise else 1, figsize=(10 if show_noise else 5.5, height), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    markers = {name: "os^Dvp*"[i % 7] for i, name in enumerate(names)}

    def draw(axes: Axes, members: list[dict[str, Any]], key: str, name: str, style: str, label: str) -> None:
        errors = [row.get(f"{y}_std") or 0.0 for row in members]
        seeds = sorted({row["seeds"] for row in members if "seeds" in row})
        if seeds:
            label += f" ({'/'.join(map(str, seeds))} seeds)"
        axes.errorbar([row[key] for row in members], [row[y] for row in members],
                      yerr=errors if any(errors) else None, fmt=markers[name] + style, color=colors[name],
                      label=label, alpha=0.8, markersize=7, capsize=4)

    left = axes[0][0]
    single = len({row[x] for row in done}) == 1  # one sparsity: the series side by side, not stacked on one x
    for position, (name, members) in enumerate(sorted(_by_series(done, series).items())):
        members = sorted(members, key=lambda row: row[x])
        if single:
            offsets = np.linspace(-0.25, 0.25, len(members)) if len(members) > 1 else [0.0]
            members = [{**row, "_at": position + offset} for row, offset in zip(members, offsets)]
            draw(left, members, "_at", name, "", f"{position + 1}. {name}" if long_names else name)
            continue
        style = "-" if len({row[x] for row in members}) > 1 else ""  # a line only along varying sparsity
        draw(left, members, x, name, style, f"{position + 1}. {name}" if long_names and single else name)
    if single:
        ticks = [f"{i + 1}" for i in range(len(names))] if long_names else names  # numbered in the legend
        left.set_xticks(range(len(names)), labels=ticks, fontsize="small")
        left.set(xlabel=f"{series} (final {x} {done[0][x]:.4g})", ylabel=y, title=f"{y} by {series}")
    else:
        left.set(xlabel=f"final {x}", ylabel=y, title=f"{y} vs final {x}")
    left.grid(alpha=0.3)
    if done:
        _legend(left, series, long_names)

    if show_noise:
        right = axes[0][1]
        for name, members in sorted(_by_series(noisy, series).items()):
            draw(right, sorted(members, key=lambda row: row[noise]), noise, name, "-", name)
        for name, members in sorted(_by_series([r for r in done if not r.get("noise_used")], series).items()):
            mean = sum(row[y] for row in members) / len(members)
            right.axhline(mean, linestyle="--", color=colors[name], label=f"{name} (no noise)")
            if len(members) == 1 and members[0].get(f"{y}_std"):  # one configuration: its ±1 std as a band
                std = members[0][f"{y}_std"]
                right.axhspan(mean - std, mean + std, color=colors[name], alpha=0.08)
        right.set_xscale("log")
        right.set(xlabel=noise, ylabel=y, title=f"{y} vs {noise}")
        right.grid(alpha=0.3)
        _legend(right, series, long_names)

    left_out = len(rows) - len(done)
    what = "configurations" if any("seeds" in row for row in rows) else "jobs"
    caption = f"{len(done)} of {len(rows)} {what} plotted" + (f"; {left_out} failed, missing or without result"
                                                               if left_out else "")
    if any(f"{y}_std" in row for row in done):
        caption += "; error bars: ±1 std over seeds"
    figure.suptitle(f"{title}\n{caption}" if title else caption, fontsize="medium")
    return _save(figure, path)


def _legend(axes: Axes, title: str, below: bool) -> None:
    """A legend inside the axes, or below them when its names are long (so it covers no data)."""
    if below:
        axes.legend(title=title, fontsize="x-small", title_fontsize="small", loc="upper center",
                    bbox_to_anchor=(0.5, -0.16), ncol=1)
    else:
        axes.legend(title=title, fontsize="small")


def _subplots(*grid: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a figure of its own, drawn by Agg when saved."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, squeeze=squeeze)


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
