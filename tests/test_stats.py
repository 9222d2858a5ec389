"""Mask statistics against a brute-force recount."""

import math

import pytest
import torch
from torch import nn

from lightning_masks import Selector, attach
from lightning_masks.masking.stats import format_layer_table, histogram, layer_rows, mask_stats


def masked_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    masked = attach(model, init=lambda w: torch.randn_like(w) * 3)
    return model, masked


def recount(entries):
    gates = [torch.sigmoid(e.gate.scores.detach()).flatten()[e.gate.keep.flatten()].tolist() for e in entries]
    flat = [g for layer in gates for g in layer]
    total = sum(e.numel for e in entries)
    mean = sum(flat) / len(flat)
    return {
        "sparsity": 1 - len(flat) / total,
        "kept": len(flat),
        "gate_mean": mean,
        "gate_std": math.sqrt(sum((g - mean) ** 2 for g in flat) / (len(flat) - 1)),
        "gate_min": min(flat),
        "gate_max": max(flat),
        "undecided": sum(0.1 < g < 0.9 for g in flat) / len(flat),
    }


def test_statistics_match_a_brute_force_recount():
    _, masked = masked_model()
    Selector(layer_floor=0.0)(masked, 0.4)
    values = {k: v.item() for k, v in mask_stats(masked).items()}
    for entry in masked:
        for key, expected in recount([entry]).items():
            assert math.isclose(values[f"{entry.name}/{key}"], expected, rel_tol=1e-5, abs_tol=1e-6), key
    for key, expected in recount(masked).items():
        assert math.isclose(values[f"global/{key}"], expected, rel_tol=1e-5, abs_tol=1e-6), key


@pytest.mark.parametrize("regrow", [False, True])
def test_flips_count_exactly_the_flipped_keep_bits(regrow):
    _, masked = masked_model()
    selector = Selector(layer_floor=0.0, regrow=regrow)
    first = selector(masked, 0.3)
    assert sum(v.item() for v in first.flips.values()) == first.pruned  # all from the dense start
    previous = [e.gate.keep.clone() for e in masked]
    with torch.no_grad():  # reshuffle importance so the next update moves entries around
        for e in masked:
            e.gate.scores.copy_(torch.randn_like(e.gate.scores) * 3)
    second = selector(masked, 0.6)
    recount = [int((p != e.gate.keep).sum()) for p, e in zip(previous, masked)]
    assert [second.flips[e.name].item() for e in masked] == recount
    values = mask_stats(masked, second.flips)
    assert values["global/flips"].item() == sum(recount)
    assert values["1.weight/flips"].item() == recount[1]
    assert mask_stats(masked)["global/flips"].item() == 0


def test_histogram_and_layer_table():
    counts, edges = histogram(torch.tensor([0.05, 0.5, 0.55, 0.95]), bins=10)
    assert counts.tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1] and len(edges) == 11
    _, masked = masked_model()
    Selector(layer_floor=0.0)(masked, 0.5)
    rows = layer_rows(masked)
    assert [(r["name"], r["shape"], r["total"]) for r in rows] == [("0.weight", "5x7", 35), ("1.weight", "3x5", 15)]
    assert sum(r["kept"] for r in rows) == 25
    table = format_layer_table(rows)
    assert "0.weight" in table and "5x7" in table and table.endswith("pruned 25/50 (50.00%)")
