"""The sweep plot: accuracy against sparsity, one series per init strategy (and against ``noise_scale``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import extra
from .._figures import legend, save, subplots

with extra("plots"):
    from matplotlib.axes import Axes

__all__ = ["plot_sweep"]


def _by_series(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(str(row.get(key) or "?"), []).append(row)
    return series


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None,
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
    figure, axes = subplots(1, 2 if show_noise else 1, figsize=(10 if show_noise else 5.5, height), squeeze=False)
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
        legend(left, series, long_names)

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
        legend(right, series, long_names)

    left_out = len(rows) - len(done)
    what = "configurations" if any("seeds" in row for row in rows) else "jobs"
    caption = f"{len(done)} of {len(rows)} {what} plotted" + (f"; {left_out} failed, missing or without result"
                                                               if left_out else "")
    if any(f"{y}_std" in row for row in done):
        caption += "; error bars: ±1 std over seeds"
    figure.suptitle(f"{title}\n{caption}" if title else caption, fontsize="medium")
    return save(figure, path)
