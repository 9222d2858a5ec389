"""Selection: exact counts, ties, floors, regrowth, N:M, thresholds and scale beyond torch.quantile."""

import math

import pytest
import torch
from helpers import TiedLM, keep_all
from helpers.oracles import keys64, kth_smallest
from torch import nn

from lightning_masks import Selector, attach, fold, list_importances, register_importance
from lightning_masks.selection import importance as importance_module
from lightning_masks.selection import kth as kth_module
from lightning_masks.selection import ranked as ranked_module
from lightning_masks.selection.importance import effective_weight_importance, get_importance
from lightning_masks.selection.selector import parse_granularity


def model_with_masks(seed=0, sizes=((30, 20), (20, 10), (10, 5))):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in sizes])
    return model, attach(model, init=lambda w: w.abs() + torch.rand_like(w))


def brute_force_keep(masked, importance, target):
    values = torch.cat([get_importance(importance)(e).flatten() for e in masked])
    count = round(target * values.numel())
    order = sorted(range(values.numel()), key=lambda i: (values[i].item(), i))
    keep = torch.ones(values.numel(), dtype=torch.bool)
    keep[order[:count]] = False
    return keep


@pytest.mark.parametrize("importance", list_importances())
@pytest.mark.parametrize("target", [0.0, 0.1, 0.5, 0.9, 0.97])
def test_global_selection_matches_a_brute_force_sort(importance, target):
    _, masked = model_with_masks()
    expected = brute_force_keep(masked, importance, target)
    pruned, threshold, _ = Selector(importance=importance, layer_floor=0.0)(masked, target)
    got = torch.cat([e.gate.keep.flatten() for e in masked])
    assert pruned == round(target * got.numel()) == int((~got).sum())
    assert torch.equal(got, expected)
    if pruned:
        values = torch.cat([get_importance(importance)(e).flatten() for e in masked])
        assert math.log(threshold) == pytest.approx(values[~got].max().item(), rel=1e-6)


def test_ties_are_broken_by_position_deterministically():
    layer = nn.Linear(10, 10)
    [entry] = attach(layer, init=torch.zeros_like)
    with torch.no_grad():
        layer.parametrizations.weight.original.fill_(1.0)
    Selector(layer_floor=0.0)([entry], 0.37)
    assert torch.equal(entry.gate.keep.flatten(), torch.arange(100) >= 37)


def test_layer_mode_prunes_each_layer_to_the_target():
    _, masked = model_with_masks()
    total, threshold, _ = Selector(mode="layer")(masked, 0.7)
    assert threshold is None
    counts = [int((~e.gate.keep).sum()) for e in masked]
    assert counts == [round(0.7 * e.numel) for e in masked] and total == sum(counts)


def test_pruned_entries_stay_pruned_unless_regrowth():
    _, masked = model_with_masks()
    Selector(layer_floor=0.0)(masked, 0.5)
    before = [e.gate.keep.clone() for e in masked]
    with torch.no_grad():  # make pruned entries the most important now
        for e in masked:
            e.gate.scores[~e.gate.keep] += 100.0
    Selector(layer_floor=0.0)(masked, 0.6)
    assert all(torch.all(b | ~e.gate.keep) for b, e in zip(before, masked))  # nothing came back
    assert sum(int((~e.gate.keep).sum()) for e in masked) == round(0.6 * sum(e.numel for e in masked))
    Selector(layer_floor=0.0, regrow=True)(masked, 0.6)
    assert any(torch.any(~b & e.gate.keep) for b, e in zip(before, masked))  # regrown
    assert sum(int((~e.gate.keep).sum()) for e in masked) == round(0.6 * sum(e.numel for e in masked))


def test_lower_target_does_not_regrow_without_regrowth():
    _, masked = model_with_masks()
    Selector()(masked, 0.8)
    assert Selector()(masked, 0.5).pruned == round(0.8 * sum(e.numel for e in masked))


@pytest.mark.parametrize("compact", [False, True])
def test_target_zero_keeps_everything_and_counts_the_bits_it_flips(compact):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10))
    masked = attach(model, compact=compact)
    names = [e.name for e in masked]
    first = Selector()(masked, 0.0)  # nothing pruned yet: nothing to write
    assert first.pruned == 0 and list(first.flips) == names and all(int(v) == 0 for v in first.flips.values())
    if compact:
        return  # compact gates cannot regrow
    Selector()(masked, 0.5)
    pruned = [int((~e.gate.keep).sum()) for e in masked]
    back = Selector(regrow=True)(masked, 0.0)
    assert all(bool(e.gate.keep.all()) for e in masked)
    assert [int(back.flips[name]) for name in names] == pruned and sum(pruned) == 400


def test_layer_floor_keeps_every_layer_alive_on_a_tied_embedding_model():
    torch.manual_seed(0)
    model = TiedLM()
    masked = attach(model, targets=["head.weight", "hidden.*"])
    numel = sum(e.numel for e in masked)
    unfloored = [e.gate.keep.clone() for e in masked]
    Selector(layer_floor=0.0)([_with_keep(e, k) for e, k in zip(masked, unfloored)], 0.9)
    wiped = [e.name for e in masked if not e.gate.keep.any()]
    assert set(wiped) == {"hidden.0.weight", "hidden.2.weight"}  # the failure the floor exists for
    for e in masked:
        keep_all(e.gate)
    pruned = Selector(layer_floor=0.25)(masked, 0.9).pruned
    assert pruned == round(0.9 * numel) == sum(int((~e.gate.keep).sum()) for e in masked)
    for e in masked:
        assert int(e.gate.keep.sum()) >= math.ceil(0.25 * 0.1 * e.numel), e.name


def _with_keep(entry, keep):
    entry.gate.set_keep(keep)
    return entry


def test_unreachable_target_under_the_floor_is_refused():
    _, masked = model_with_masks(sizes=((4, 4), (4, 4)))
    with pytest.raises(ValueError, match="lower layer_floor or the target"):
        Selector(layer_floor=1.0)(masked, 0.6)


@pytest.mark.parametrize("spec", ["2:4", "1:4", "3:8"])
def test_nm_every_group_keeps_exactly_n(spec):
    granularity = parse_granularity(spec)
    _, masked = model_with_masks(sizes=((16, 8), (8, 8)))
    selector = Selector(granularity=spec)
    selector.check(masked)
    pruned = selector(masked, granularity.sparsity).pruned
    for e in masked:
        groups = e.gate.keep.reshape(-1, granularity.m).sum(1)
        assert torch.all(groups == granularity.n)
    assert pruned == sum(e.numel for e in masked) * (granularity.m - granularity.n) // granularity.m
    # halfway along the ramp, half of the pruned share per group
    _, masked = model_with_masks(sizes=((16, 8),))
    Selector(granularity="2:4")(masked, 0.25)
    assert torch.all(masked[0].gate.keep.reshape(-1, 4).sum(1) == 3)


@pytest.mark.parametrize("spec", ["4:2", "0:4", "2-4", "2:2", "channels"])
def test_invalid_nm_spec_is_refused(spec):
    with pytest.raises(ValueError, match=rf"invalid granularity '{spec}'"):
        parse_granularity(spec)


def test_nm_needs_divisible_rows():
    _, masked = model_with_masks(sizes=((6, 4),))
    with pytest.raises(ValueError, match=r"2:4 needs rows divisible by 4, but '0.weight' of shape \(4, 6\)"):
        Selector(granularity="2:4").check(masked)


def test_threshold_prunes_gates_below_it():
    _, masked = model_with_masks()
    pruned, threshold, _ = Selector().threshold(masked, 0.7)
    assert threshold == 0.7
    gates = torch.cat([torch.sigmoid(e.gate.scores.detach()).flatten() for e in masked])
    assert pruned == int((gates < 0.7).sum()) > 0
    assert torch.equal(torch.cat([e.gate.keep.flatten() for e in masked]), gates >= 0.7)


def test_nan_scores_are_named():
    _, masked = model_with_masks()
    with torch.no_grad():
        masked[1].gate.scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"importance of '1.weight' is NaN"):
        Selector()(masked, 0.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "local"}, "mode must be 'global', 'layer' or 'row'"),
    ({"importance": "taylor"}, r"unknown importance 'taylor'; known criteria: \['effective_weight', 'gate'\]"),
    ({"layer_floor": 1.5}, r"layer_floor must be in \[0, 1\], got 1.5"),
])
def test_bad_selector_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Selector(**kwargs)


@pytest.mark.slow
def test_exact_count_beyond_quantile_limit_at_thirty_million():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5000, 4000, bias=False), nn.Linear(4000, 2500, bias=False))
    with torch.no_grad():
        model[1].weight[:100] = 0.01  # 400,000 exact ties
    masked = attach(model)
    total = sum(e.numel for e in masked)
    assert total == 30_000_000 > 2**24
    count = round(0.9 * total)
    assert Selector(layer_floor=0.0)(masked, 0.9).pruned == count
    assert sum(int((~e.gate.keep).sum()) for e in masked) == count
    values = [get_importance("effective_weight")(e) for e in masked]
    highest_pruned = max(v[~e.gate.keep].max() for v, e in zip(values, masked))
    lowest_kept = min(v[e.gate.keep].min() for v, e in zip(values, masked))
    assert highest_pruned <= lowest_kept
    # the k-th value agrees with a brute force (the test may concatenate; the library must not)
    key, ties = kth_smallest(lambda: iter(values), count)
    kth = torch.cat([v.flatten() for v in values]).kthvalue(count).values
    assert keys64(kth.reshape(1)).item() == key and ties >= 1


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_channel_selection_prunes_whole_output_channels_exactly(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 6))
    masked = attach(model, per_channel=True)
    assert [tuple(e.gate.scores.shape) for e in masked] == [(8, 1, 1, 1), (6, 1)]
    assert torch.allclose(masked[0].gate.scores.flatten(), model[0].parametrizations.weight.original.abs()
                          .mean(dim=(1, 2, 3)))  # channel magnitude: the filter's mean |w|
    pruned = Selector(mode=mode, granularity="channel", layer_floor=0.0)(masked, 0.5).pruned
    assert pruned == (7 if mode == "global" else 4 + 3) == sum(int((~e.gate.keep).sum()) for e in masked)
    if mode == "global":  # the channels with the lowest mean |w * gate| go
        values = [get_importance("effective_weight")(e) for e in masked]
        cut = max(v[~e.gate.keep].max() for v, e in zip(values, masked) if (~e.gate.keep).any())
        assert cut <= min(v[e.gate.keep].min() for v, e in zip(values, masked) if e.gate.keep.any())
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fold(model)
    assert torch.allclose(model(x), expected, atol=1e-6)
    for layer, entry in ((model[0], masked[0]), (model[2], masked[1])):
        rows = layer.weight.reshape(layer.weight.shape[0], -1)
        assert torch.equal((rows == 0).all(1), ~entry.gate.keep.flatten())
        assert torch.equal(layer.bias == 0, ~entry.gate.keep.flatten())  # the whole channel, bias too


def reference_keep(masked, importance, target, floor, regrow):
    """Brute force of the documented rule: pruned entries first (without regrowth), each tensor's top
    ``min(ceil(floor * (1 - target) * units), alive)`` entries protected (ties: later positions), then the
    ``count`` lowest by (importance, position)."""
    entries, offset = [], 0
    total = sum(e.units for e in masked)
    alive = [e.units if regrow else int(e.gate.keep.sum()) for e in masked]
    count = max(round(target * total), total - sum(alive))
    for e, n_alive in zip(masked, alive):
        values = get_importance(importance)(e).flatten().tolist()
        flags = [1 if regrow else int(k) for k in e.gate.keep.flatten().tolist()]
        ranked = sorted(range(len(values)), key=lambda i: (flags[i], values[i], i))
        m = min(math.ceil(floor * (1.0 - target) * e.units), n_alive) if floor > 0 else 0
        top = set(ranked[len(ranked) - m:]) if m else set()
        entries += [(int(i in top), flags[i], values[i], offset + i) for i in range(len(values))]
        offset += len(values)
    keep = torch.ones(total, dtype=torch.bool)
    for *_, position in sorted(entries)[:count]:
        keep[position] = False
    return keep


# The keys of all tensors in one buffer (156 weights: the default), per tensor with the first and last cached (120),
# per tensor recomputed at every pass (0).
@pytest.mark.parametrize("cache", [None, 120, 0])
@pytest.mark.parametrize("seed", range(8))
def test_selection_matches_the_brute_force_rule_with_floors_ties_and_history(seed, cache, monkeypatch):
    if cache is not None:
        monkeypatch.setattr(ranked_module, "CACHE_ELEMENTS", cache)
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 9), nn.Linear(9, 4), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # a small-scale layer the floor has to protect
        if seed % 2:
            model[0].weight.copy_((model[0].weight * 4).round() / 4)  # many exact ties, zeros (-inf) among them
    masked = attach(model, rescale=seed % 3 == 0, init=lambda w: (w.abs() * 3).round())
    importance = ("gate", "effective_weight")[seed % 2]
    regrow = seed % 4 == 1
    for target, floor in ((0.3, 0.25), (0.6, 0.9), (0.85, 0.25), (0.85, 0.0)):
        with torch.no_grad():  # scores move between updates
            for e in masked:
                e.gate.scores.add_(torch.randn(e.gate.scores.shape, generator=rng).round())
        expected = reference_keep(masked, importance, target, floor, regrow)
        result = Selector(importance=importance, layer_floor=floor, regrow=regrow)(masked, target)
        got = torch.cat([e.gate.keep.flatten() for e in masked])
        assert torch.equal(got, expected), (target, floor)
        assert result.pruned == int((~got).sum())


def test_pruned_entries_stay_pruned_even_below_alive_entries_of_importance_minus_infinity():
    torch.manual_seed(0)
    layer = nn.Linear(10, 10)
    [entry] = attach(layer)
    Selector(layer_floor=0.0)([entry], 0.3)
    pruned_before = ~entry.gate.keep.clone()
    with torch.no_grad():  # zero the last alive weights: their importance is log|0| = -inf
        alive = entry.gate.keep.flatten().nonzero().flatten()
        layer.parametrizations.weight.original.view(-1)[alive[-20:]] = 0.0
    result = Selector(layer_floor=0.0)([entry], 0.4)
    pruned = ~entry.gate.keep
    assert torch.all(pruned[pruned_before])  # nothing came back, though the zeros tie with them at -inf
    assert int(pruned.sum()) == 40 == result.pruned
    assert set(pruned.flatten().nonzero().flatten().tolist()) - set(pruned_before.flatten().nonzero().flatten()
                                                                     .tolist()) == set(alive[-20:-10].tolist())


def test_selection_without_the_cache_and_in_small_slices_gives_the_same_masks(monkeypatch):
    results = []
    for cache, slice_size in ((ranked_module.CACHE_ELEMENTS, kth_module.SLICE), (0, 7)):
        monkeypatch.setattr(ranked_module, "CACHE_ELEMENTS", cache)
        monkeypatch.setattr(kth_module, "SLICE", slice_size)  # the one knob: selection slices by it too
        _, masked = model_with_masks(seed=3)
        with torch.no_grad():
            masked[0].gate.scores[:5] = 0.5  # ties
        Selector()(masked, 0.4)
        selection = Selector(regrow=True)(masked, 0.7)
        results.append((torch.cat([e.gate.keep.flatten() for e in masked]), selection.pruned, selection.threshold))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1:] == results[1][1:]


def tied_bns(seed=0):
    """Three BatchNorms of 8 channels (as if adding into one stream) and one of 6, masked per channel."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({name: nn.BatchNorm1d(c) for name, c in (("a", 8), ("b", 8), ("c", 8), ("other", 6))})
    for bn in model.values():
        nn.init.uniform_(bn.weight, 0.1, 2.0)
        nn.init.uniform_(bn.bias, 0.1, 1.0)
    return model, attach(model, targets=["*.weight"], per_channel=True)


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_tied_tensors_prune_the_same_units_ranked_by_their_summed_importance(mode):
    model, masked = tied_bns()
    selector = Selector(mode=mode, granularity="channel", layer_floor=0.0, tie=[["a.weight", "[bc].weight"]])
    selection = selector(masked, 0.5)
    a, b, c, other = (e.gate.keep for e in masked)
    assert torch.equal(a, b) and torch.equal(a, c)
    if mode == "layer":  # the group is one layer of 8 units
        assert int((~a).sum()) == 4 and int((~other).sum()) == 3
    assert selection.pruned == int((~a).sum()) + int((~other).sum()) == (4 + 3 if mode == "layer" else 7)
    assert set(selection.flips) == {"a.weight", "b.weight", "c.weight", "other.weight"}
    # the tied units that go are those of the lowest summed |w * gate|, whatever each member alone says
    summed = sum(get_importance("effective_weight")(e).exp() for e in masked[:3])
    assert summed[~a].max() <= summed[a].min()
    # pruned stays pruned: the tie holds over raising the target
    before = a.clone()
    selector(masked, 0.75)
    assert torch.equal(masked[0].gate.keep, masked[1].gate.keep) and not (masked[0].gate.keep & ~before).any()
    fold(model)
    for name in "abc":
        assert torch.equal(model[name].weight == 0, ~masked[0].gate.keep) and torch.equal(
            model[name].bias == 0, ~masked[0].gate.keep)  # scale and shift: the channel outputs exact zeros


def test_tied_units_follow_a_gate_threshold_together():
    _, masked = tied_bns()
    with torch.no_grad():
        masked[0].gate.scores[:2] = -9.0  # only a's gate is low on channels 0 and 1
        masked[1].gate.scores[:2] = -9.0
        masked[2].gate.scores[1] = -9.0
    Selector(granularity="channel", tie=[["[abc].weight"]]).threshold(masked, 0.1)
    assert masked[0].gate.keep.tolist() == [True, False] + [True] * 6  # a unit stays while any member keeps it
    assert all(torch.equal(e.gate.keep, masked[0].gate.keep) for e in masked[1:3]) and masked[3].gate.keep.all()


@pytest.mark.parametrize("tie, message", [
    ([["a.weight", "nothing.*"]], "'nothing.*' matches no masked tensor"),
    ([["a.weight", "b.weight"], ["b.weight", "c.weight"]], "'b.weight' is in two tie groups"),
    ([["a.weight", "other.weight"]], "the same number of units"),
])
def test_bad_tie_groups_are_refused_by_check_naming_the_problem(tie, message):
    _, masked = tied_bns()
    with pytest.raises(ValueError, match=message):
        Selector(granularity="channel", tie=tie).check(masked)
    assert all(e.gate.keep.all() for e in masked)


@pytest.mark.parametrize("kwargs, message", [
    ({"tie": "a.weight"}, "tie must be .auto. or a list of groups"),
    ({"tie": [[]]}, "tie must be .auto. or a list of groups"),
    ({"tie": [["a.*"]], "granularity": "2:4"}, "tie cannot be combined with N:M"),
])
def test_malformed_tie_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Selector(**kwargs)


@pytest.mark.parametrize("importance", list_importances())
@pytest.mark.parametrize("first, then", [(0.3, 0.9), (0.5, 0.8), (0.7, 0.7), (0.6, 0.95)])
def test_raising_a_mostly_pruned_selection_ranks_only_live_units_like_a_brute_force_sort(importance, first, then):
    _, masked = model_with_masks(seed=3)
    with torch.no_grad():  # coarse weights: many exact ties, broken by position (tensor order, then flat index)
        for e in masked:
            e.weight.copy_((e.weight * 8).round() / 8)
    Selector(importance=importance, layer_floor=0.0)(masked, first)
    before = torch.cat([e.gate.keep.flatten() for e in masked])
    values = torch.cat([get_importance(importance)(e).flatten() for e in masked])
    live = before.nonzero().flatten().tolist()
    count = round(then * values.numel()) - int((~before).sum())
    order = sorted(live, key=lambda i: (values[i].item(), i))
    expected = before.clone()
    expected[order[:max(count, 0)]] = False
    selection = Selector(importance=importance, layer_floor=0.0)(masked, then)
    assert torch.equal(torch.cat([e.gate.keep.flatten() for e in masked]), expected)
    assert selection.pruned == int((~expected).sum())


def test_a_criterion_that_takes_the_masked_tensor_alone_selects_like_the_built_in(monkeypatch):
    monkeypatch.setattr(importance_module._CRITERIA, "_entries", dict(importance_module._CRITERIA._entries))
    register_importance("whole", indexed=False)(lambda entry: effective_weight_importance(entry))
    picks = []
    for importance in ("effective_weight", "whole"):
        _, masked = model_with_masks(seed=3)
        Selector(importance=importance)(masked, 0.6)
        Selector(importance=importance)(masked, 0.9)  # mostly pruned: the live units are ranked
        picks.append(torch.cat([e.gate.keep.flatten() for e in masked]))
    assert torch.equal(*picks) and 0 < int(picks[0].sum()) < picks[0].numel()


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_row_selection_prunes_each_output_units_least_important_weights(target):
    """mode='row' (Wanda's comparison group): every row of every tensor prunes round(target * row) entries, its
    least important by the selector's importance."""
    _, masked = model_with_masks()
    pruned, threshold, _ = Selector(mode="row")(masked, target)
    total = 0
    for entry in masked:
        importance = get_importance("effective_weight")(entry)
        for row_keep, row_importance in zip(entry.gate.keep, importance):
            count = round(target * row_keep.numel())
            expected = torch.ones_like(row_keep)
            expected[row_importance.argsort()[:count]] = False
            assert torch.equal(row_keep, expected)
            total += count
    assert pruned == total and threshold is None


def test_row_selection_keeps_pruned_entries_pruned_without_regrowth():
    _, masked = model_with_masks()
    entry = masked[0]
    entry.gate.set_keep(torch.arange(entry.numel).reshape(entry.weight.shape) % 5 != 0)  # a fifth of each row gone
    before = entry.gate.keep.clone()
    Selector(mode="row")(masked, 0.5)
    assert not (entry.gate.keep & ~before).any()
    assert torch.all((~entry.gate.keep).sum(1) == entry.weight.shape[1] // 2)  # half of each row, the fifth among them


@pytest.mark.parametrize("granularity", ["channel", "2:4"])
def test_row_selection_needs_element_granularity(granularity):
    with pytest.raises(ValueError, match="mode='row' prunes each output unit's weights, so it needs granularity="):
        Selector(mode="row", granularity=granularity)


@pytest.mark.parametrize("tie", [[["a.*", "b.*"]], "auto"])
def test_row_selection_refuses_tie_which_it_would_ignore(tie):
    with pytest.raises(ValueError, match="mode='row' prunes each output unit of each tensor on its own"):
        Selector(mode="row", tie=tie)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_row_selection_takes_a_1d_tensor_as_one_row(target):
    """A masked norm scale or bias has one entry per output unit: ranked as one row (as per layer), not pruned whole
    as rows of one entry each would be."""
    layer = nn.LayerNorm(20)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 21.0))
    (entry,) = attach(layer, ["weight"])
    Selector(mode="row")([entry], target)
    assert torch.equal(entry.gate.keep, torch.arange(20) >= round(target * 20))
