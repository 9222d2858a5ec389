"""PNG pictures of pruning runs, as plain functions of plain data (rows of dicts, tensors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["plot_sweep"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    done = [row for row in rows if row.get("status") == "ok" and row.get(x) is not None and row.get(y) is not None]
    noisy = [row for row in done if row.get("noise_used") and row.get(noise) is not None]
    show_noise = len({row[noise] for row in noisy}) > 1
    figure, axes = plt.subplots(1, 2 if show_noise else 1, figsize=(10 if show_noise else 5.5, 4), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(sorted(_by_series(done, series)))}

    left = axes[0][0]
    for name, members in sorted(_by_series(done, series).items()):
        members = sorted(members, key=lambda row: row[x])
        left.plot([row[x] for row in members], [row[y] for row in members], "o-", color=colors[name], label=name,
                  alpha=0.8)
    left.set(xlabel=f"final {x}", ylabel=y, title=f"{y} vs {x}")
    left.grid(alpha=0.3)
    if done:
        left.legend(title=series, fontsize="small")

    if show_noise:
        right = axes[0][1]
        for name, members in sorted(_by_series(noisy, series).items()):
            members = sorted(members, key=lambda row: row[noise])
            right.plot([row[noise] for row in members], [row[y] for row in members], "o-", color=colors[name],
                       label=name)
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
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
