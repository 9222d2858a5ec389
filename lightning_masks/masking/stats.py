"""Mask statistics as plain tensors and rows: no logging here, no host sync until the caller asks.

Gate statistics are over the kept entries (the live gates) and use the raw gate ``sigmoid(scores / T)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from .gate import gate_value
from .masks import MaskedTensor
from .targets import resolve_targets

__all__ = ["nonzero_counts"]

#: A gate strictly between these is undecided.
_UNDECIDED = (0.1, 0.9)


def live_gates(entry: MaskedTensor) -> Tensor:
    """The raw gates ``sigmoid(scores / T)`` of the kept units, flattened."""
    gate = entry.gate
    return gate_value(gate.scores.detach().float(), gate.temperature)[gate.keep]


def _moments(entry: MaskedTensor, flips: Optional[Tensor]) -> dict[str, Tensor]:
    """Sums from which per-tensor and global statistics are both derived (0-dim tensors)."""
    keep = entry.gate.keep
    live = live_gates(entry)
    nan = torch.tensor(float("nan"), device=keep.device)
    zero = torch.zeros((), device=keep.device)
    return {
        "total": torch.tensor(float(entry.numel), device=keep.device),
        "kept": keep.sum().float() * entry.unit_size,
        "live": keep.sum().float(),
        "gate_sum": live.sum(),
        "gate_sumsq": (live * live).sum(),
        "gate_min": live.min() if live.numel() else nan,
        "gate_max": live.max() if live.numel() else nan,
        "undecided": ((live > _UNDECIDED[0]) & (live < _UNDECIDED[1])).sum().float(),
        "flips": flips.float() if flips is not None else zero,
    }


def _finish(m: Mapping[str, Tensor]) -> dict[str, Tensor]:
    kept, live = m["kept"], m["live"]
    mean = m["gate_sum"] / live
    variance = (m["gate_sumsq"] / live - mean * mean).clamp_min(0) * live / (live - 1).clamp_min(1)
    return {
        "sparsity": 1 - kept / m["total"],
        "kept": kept,
        "gate_mean": mean,
        "gate_std": variance.sqrt(),
        "gate_min": m["gate_min"],
        "gate_max": m["gate_max"],
        "undecided": m["undecided"] / live,
        "flips": m["flips"],
    }


def mask_stats(masked: Sequence[MaskedTensor], flips: Optional[Mapping[str, Tensor]] = None, *,
               combine: Optional[Callable[[list[dict[str, Tensor]]], list[dict[str, Tensor]]]] = None
               ) -> dict[str, Tensor]:
    """Per-tensor statistics keyed ``"<name>/<stat>"`` and global ones keyed ``"global/<stat>"``: ``sparsity``,
    ``kept``, the live gates' ``gate_mean`` / ``gate_std`` / ``gate_min`` / ``gate_max``, the share ``undecided``,
    and ``flips``, the keep bits the last update flipped (``flips``: per tensor name, from
    :class:`~lightning_masks.selection.selector.Selection`; 0 where absent).

    ``combine`` maps the per-tensor moments (sums, min and max) before the statistics are derived from them, e.g. to
    sum the moments of every process's shards of sharded tensors."""
    flips = flips or {}
    moments = [_moments(entry, flips.get(entry.name)) for entry in masked]
    if combine is not None:
        moments = combine(moments)
    result = {}
    for entry, m in zip(masked, moments):
        result.update({f"{entry.name}/{k}": v for k, v in _finish(m).items()})
    if moments:
        combined = {k: torch.stack([m[k].to(moments[0][k].device) for m in moments]) for k in moments[0]}
        totals = {k: v.sum() for k, v in combined.items()}
        totals["gate_min"] = combined["gate_min"].nan_to_num(float("inf")).min()
        totals["gate_max"] = combined["gate_max"].nan_to_num(float("-inf")).max()
        result.update({f"global/{k}": v for k, v in _finish(totals).items()})
    return result


def histogram(values: Tensor, bins: int = 64, low: float = 0.0, high: float = 1.0) -> tuple[Tensor, Tensor]:
    """Return ``(counts, edges)`` of ``values`` over ``[low, high]`` (computed on the values' device)."""
    values = values.detach().float().flatten()
    if high <= low:
        high = low + 1.0
    counts = torch.histc(values, bins=bins, min=low, max=high)
    return counts, torch.linspace(low, high, bins + 1)


def layer_rows(masked: Sequence[MaskedTensor]) -> list[dict]:
    """One row per masked tensor: name, shape, kept, total, sparsity (host values)."""
    kept = nonzero_counts([entry.gate.keep for entry in masked])
    return [_row(entry.name, entry.weight.shape, n * entry.unit_size, entry.numel) for entry, n in zip(masked, kept)]


def nonzero_counts(tensors: Sequence[Tensor]) -> list[int]:
    """The number of nonzero entries of each tensor, as host ints read in one sync where they share a device (a
    mask update asks for one count per masked tensor, and each sync costs as much as a small count)."""
    counts = [tensor.count_nonzero() for tensor in tensors]
    if len({count.device for count in counts}) > 1:
        return [int(count) for count in counts]
    return torch.stack(counts).tolist() if counts else []


def _row(name: str, shape: Sequence[int], kept: int, total: int) -> dict:
    return {"name": name, "shape": "x".join(map(str, shape)), "kept": kept, "total": total,
            "sparsity": 1 - kept / total}


def zero_rows(model: nn.Module, targets: Optional[Sequence] = None, exclude: Sequence = ()) -> list[dict]:
    """:func:`layer_rows` of a plain (folded) model: its exact zeros in the tensors ``targets``/``exclude`` select
    (:func:`~lightning_masks.masking.targets.resolve_targets`; the names of the tensors a fit masked, to count what it
    pruned). Frozen tensors are counted too: a fit masks them with ``frozen="mask"`` or ``"gate"``."""
    rows = []
    for name, owners in resolve_targets(model, targets, exclude, mask_frozen=True).chosen.items():
        tensor = getattr(*owners[0])
        rows.append(_row(name, tensor.shape, int(tensor.count_nonzero()), tensor.numel()))
    return rows


def pruned_and_total(rows: Sequence[Mapping]) -> tuple[int, int]:
    """``(pruned, total)`` weights over the rows of :func:`layer_rows` or :func:`zero_rows`."""
    total = sum(row["total"] for row in rows)
    return total - sum(row["kept"] for row in rows), total


def format_layer_table(rows: Sequence[Mapping]) -> str:
    """The console table of :func:`layer_rows`, ending with ``pruned a/N (x%)``."""
    header = ("layer", "shape", "kept / total", "sparsity")
    lines = [(r["name"], r["shape"], f"{r['kept']:,} / {r['total']:,}", f"{100 * r['sparsity']:.2f}%") for r in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    pruned, total = pruned_and_total(rows)
    body = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*line) for line in lines)]
    body.append(f"pruned {pruned:,}/{total:,} ({100 * pruned / max(total, 1):.2f}%)")
    return "\n".join(body)


def short_names(names: Sequence[str], limit: int = 6) -> str:
    """``names`` for a log line: numbered repeats merged (``h.0.attn``, ``h.1.attn`` -> ``h.*.attn (x2)``), at most
    ``limit`` entries, then how many more."""
    merged: dict[str, list[str]] = {}
    for name in names:
        merged.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name), []).append(name)
    shown = [f"{pattern} (x{len(group)})" if len(group) > 1 else group[0] for pattern, group in merged.items()]
    more = f", and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more
