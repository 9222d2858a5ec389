"""The parametrization, target selection, attach and fold, without a Trainer."""


import pytest
import torch
from helpers import TiedLM, prune
from torch import nn
from torch.nn.utils import parametrize

from lightning_masks import attach, fold, masked_tensors
from lightning_masks.masking import gates_disabled, restore_masks_on_load


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.c1 = nn.Conv1d(2, 2, 3)
        self.c2 = nn.Conv2d(2, 2, 3)
        self.c3 = nn.Conv3d(2, 2, 3)
        self.attn = nn.MultiheadAttention(4, 2)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.emb = nn.Embedding(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)


def test_default_targets_cover_linear_conv_attention_and_skip_the_rest():
    names = sorted(m.name for m in attach(Zoo()))
    assert names == ["attn.in_proj_weight", "attn.out_proj.weight", "c1.weight", "c2.weight", "c3.weight",
                     "lin.weight"]


def test_gate_formula_and_parametrized_forward():
    layer = nn.Linear(3, 2)
    weight = layer.weight.detach().clone()
    [entry] = attach(layer, init=lambda w: w * 2, temperature=0.5)
    prune(entry.gate, (0, 0))
    expected = weight * torch.sigmoid(weight * 2 / 0.5)
    expected[0, 0] = 0
    assert torch.allclose(layer.weight, expected)
    assert isinstance(entry.gate.scores, nn.Parameter) and entry.gate.keep.dtype == torch.bool
    assert layer.parametrizations.weight.original is entry.weight


def test_targets_by_glob_and_type_and_exclude():
    model = Zoo()
    assert [m.name for m in attach(model, targets=["c*"], exclude=["c3"])] == ["c1.weight", "c2.weight"]
    model = Zoo()
    assert [m.name for m in attach(model, targets=[nn.Conv2d, "emb.weight"])] == ["c2.weight", "emb.weight"]
    model = Zoo()
    assert [m.name for m in attach(model, targets=["lin.bias"])] == ["lin.bias"]


@pytest.mark.parametrize("field", ["targets", "exclude"])
def test_pattern_matching_nothing_names_candidates(field):
    model = Zoo()
    with pytest.raises(ValueError, match=r"'linn' matches no module.*candidates include.*lin\.weight"):
        attach(model, **{field: ["linn"]})
    assert not parametrize.is_parametrized(model.lin)


def test_nan_weight_is_named_and_model_left_unchanged():
    model = Zoo()
    with torch.no_grad():
        model.c2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'c2.weight' holds NaN or Inf"):
        attach(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_failure_half_way_restores_the_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    calls = []

    def init(weight):
        calls.append(weight)
        return torch.zeros(1) if len(calls) == 2 else weight.abs()

    with pytest.raises(ValueError, match="must keep the weight's shape"):
        attach(model, init=init)
    assert not any(parametrize.is_parametrized(m) for m in model)


def test_tied_weights_get_one_mask_and_stay_tied_after_fold():
    model = TiedLM()
    masked = attach(model, targets=["head.weight", "hidden.*"])
    assert [m.name for m in masked].count("embed.weight") + [m.name for m in masked].count("head.weight") == 1
    tied = next(m for m in masked if m.name in ("embed.weight", "head.weight"))
    assert len(tied.owners) == 2
    assert model.embed.parametrizations.weight[0] is model.head.parametrizations.weight[0]
    prune(tied.gate, slice(None, 3))
    assert torch.equal(model.embed.weight, model.head.weight)
    assert len(masked_tensors(model)) == 3
    original = tied.weight
    fold(model)
    assert model.embed.weight is model.head.weight is original
    assert (model.head.weight[:3] == 0).all()


def test_attach_twice_does_not_mask_twice():
    model = Zoo()
    first = attach(model)
    with pytest.raises(ValueError, match="no maskable tensor"):
        attach(model)
    assert len(masked_tensors(model)) == len(first)


def test_fold_gives_plain_module_with_exact_zeros_and_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    masked = attach(model)
    for entry in masked:
        prune(entry.gate, slice(None, None, 3), flat=True)
    x = torch.randn(2, 1, 6, 6)
    expected = model(x)
    kept = [int(e.gate.keep.sum()) for e in masked]
    params = [e.weight for e in masked]
    fold(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert [int((m.weight != 0).sum()) for m in (model[0], model[2])] == kept
    assert [model[0].weight, model[2].weight] == params  # same Parameter objects


def test_gates_disabled_reads_plain_weights():
    layer = nn.Linear(3, 3)
    plain = layer.weight.detach().clone()
    masked = attach(layer)
    assert not torch.equal(layer.weight, plain)
    with gates_disabled(masked):
        assert torch.equal(layer.weight, plain)
    assert not torch.equal(layer.weight, plain)


def test_masked_state_dict_loads_into_a_plain_model():
    source = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masked = attach(source, rescale=True)
    prune(masked[0].gate, 0)
    state = source.state_dict()
    target = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(RuntimeError):
        target.load_state_dict(state)
    handle = restore_masks_on_load(target)
    target.load_state_dict(state)
    handle.remove()
    x = torch.randn(3, 4)
    assert torch.equal(target(x), source(x))
    assert len(masked_tensors(target)) == 2


def test_rescale_keeps_the_initial_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(4, 5)
    dense = model(x)
    attach(model, rescale=True)
    assert torch.allclose(model(x), dense, atol=1e-6)


# ------------------------------------------------------------------------------------------ binary masks
def test_binary_mask_folds_to_the_original_weights_and_survives_a_state_dict_round_trip():
    from lightning_masks import fold_state_dict

    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    original = [m.weight.detach().clone() for m in source[::2]]
    entries = attach(source, rescale=True, compact=True, binary=["0.weight"])
    entries[0].gate.set_keep(torch.rand(6, 4) > 0.5)
    entries[1].gate.set_keep(torch.rand(2, 6) > 0.5)
    state = source.state_dict()
    assert state["0.parametrizations.weight.0.binary"] and "2.parametrizations.weight.0.binary" not in state
    target = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    handle = restore_masks_on_load(target)
    target.load_state_dict(state)
    handle.remove()
    x = torch.randn(3, 4)
    assert [e.gate.is_binary for e in masked_tensors(target)] == [True, False] and torch.equal(target(x), source(x))
    by_file = fold_state_dict(state)
    fold(source)
    kept, soft = source[0].weight != 0, source[2].weight != 0
    assert torch.equal(source[0].weight[kept], original[0][kept])  # binary: the weights themselves
    assert not torch.equal(source[2].weight[soft], original[1][soft])  # soft: scaled by the rescaled gate
    assert torch.equal(by_file["0.weight"], source[0].weight) and torch.equal(by_file["2.weight"], source[2].weight)
