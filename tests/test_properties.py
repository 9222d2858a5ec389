"""Property-based tests of selection and schedules (hypothesis)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_masks import Schedule, Selector, attach, list_importances, list_schedules
from lightning_masks.selection.importance import get_importance

shapes = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4)
targets = st.floats(0.0, 0.99, allow_nan=False)


def masked_layers(shape_list, seed, ties):
    generator = torch.Generator().manual_seed(seed)
    model = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shape_list)
    with torch.no_grad():
        for layer in model:
            values = torch.randn(layer.weight.shape, generator=generator)
            layer.weight.copy_(values.round() if ties else values)  # rounding makes many exact ties
    return attach(model)


@settings(max_examples=60, deadline=None)
@given(shapes, targets, st.integers(0, 2**16), st.booleans(), st.sampled_from(list_importances()),
       st.sampled_from(["global", "layer"]))
def test_selection_count_is_exact_and_keeps_the_most_important(shape_list, target, seed, ties, importance, mode):
    masked = masked_layers(shape_list, seed, ties)
    pruned, *_ = Selector(mode=mode, importance=importance, layer_floor=0.0)(masked, target)
    keeps = [e.gate.keep for e in masked]
    assert pruned == sum(int((~k).sum()) for k in keeps)
    if mode == "global":
        assert pruned == round(target * sum(e.numel for e in masked))
        values = [get_importance(importance)(e) for e in masked]
        cut = [v[~k] for v, k in zip(values, keeps) if (~k).any()]
        kept = [v[k] for v, k in zip(values, keeps) if k.any()]
        if cut and kept:
            assert max(c.max() for c in cut) <= min(k.min() for k in kept)
    else:
        assert [int((~k).sum()) for k in keeps] == [round(target * e.numel) for e in masked]


@settings(max_examples=40, deadline=None)
@given(shapes, st.lists(targets, min_size=2, max_size=4), st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_without_regrowth_pruned_stays_pruned_and_floor_holds(shape_list, steps, seed, floor):
    masked = masked_layers(shape_list, seed, ties=False)
    selector = Selector(layer_floor=floor)
    previous = [e.gate.keep.clone() for e in masked]
    for target in sorted(steps):
        try:
            selector(masked, target)
        except ValueError as error:  # a floor that makes the target unreachable is refused, not bent
            assert "lower layer_floor" in str(error)
            return
        assert all(torch.all(p | ~e.gate.keep) for p, e in zip(previous, masked))
        for entry, before in zip(masked, previous):
            floor_count = math.ceil(floor * (1 - target) * entry.numel)
            assert int(entry.gate.keep.sum()) >= min(floor_count, int(before.sum()))
        previous = [e.gate.keep.clone() for e in masked]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(list_schedules()), targets, targets, st.integers(0, 20), st.integers(0, 20))
def test_schedules_are_monotone_and_bounded(shape, a, b, start, length):
    initial, final = sorted((a, b))
    schedule = Schedule(shape, final=final, initial=initial, start=start, end=start + length)
    values = [schedule.value(t, start, start + length) for t in range(0, start + length + 5)]
    assert all(initial - 1e-12 <= v <= final + 1e-12 for v in values)
    assert all(y >= x - 1e-12 for x, y in zip(values, values[1:]))
    assert math.isclose(values[-1], final, abs_tol=1e-12)
