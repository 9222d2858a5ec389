"""masks_hidden: a masked model read as its plain self for a while, and restored exactly."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_masks import attach, masked_tensors, masks_hidden


def _snapshot(model):
    return ([(name, id(p)) for name, p in model.named_parameters()],
            [(name, type(m)) for name, m in model.named_modules()], list(model.state_dict()))


@pytest.mark.parametrize("per_channel", [False, True])
def test_inside_the_names_types_and_parameters_are_the_plain_model_and_after_all_is_as_before(per_channel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    plain = ([name for name, _ in model.named_parameters()], [type(m) for m in model.modules()])
    masked = attach(model, per_channel=per_channel)
    before, x = _snapshot(model), torch.randn(2, 3)
    output = model(x)
    with masks_hidden(model) as seen:
        assert seen is model
        assert sorted(name for name, _ in model.named_parameters()) == sorted(plain[0])
        assert [type(m) for m in model.modules()] == plain[1]
        assert model[0].weight is masked[0].weight and isinstance(model[0].weight, nn.Parameter)
        assert not parametrize.is_parametrized(model[0])
    assert _snapshot(model) == before and torch.equal(model(x), output)
    assert len(masked_tensors(model)) == 2


def test_a_users_parametrizations_stay_and_a_tied_weight_is_one_parameter():
    class Double(nn.Module):
        def forward(self, tensor):
            return 2 * tensor

    first, second, third = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, second, third)
    attach(model, targets=["0", "1", "2"])
    parametrize.register_parametrization(first, "bias", Double())  # another tensor of a masked module
    parametrize.register_parametrization(third, "weight", Double())  # on top of the mask
    before = _snapshot(model)
    with masks_hidden(model):
        names = [name for name, _ in model.named_parameters()]
        assert names[0] == "0.weight" and "1.weight" not in names  # one tied tensor, once
        assert "0.parametrizations.bias.original" in names and "2.parametrizations.weight.original" in names
        assert not any("scores" in n for n in names)
        assert isinstance(first, nn.Linear) and isinstance(first.weight, nn.Parameter)
        assert [type(p) for p in third.parametrizations.weight] == [Double]
        assert torch.equal(third.weight, 2 * third.parametrizations.weight.original)
        assert torch.equal(first.bias, 2 * first.parametrizations.bias.original)
    assert _snapshot(model) == before


def test_an_error_inside_restores_the_masks():
    model = nn.Sequential(nn.Linear(3, 3))
    attach(model)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="inside"), masks_hidden(model):
        raise RuntimeError("inside")
    assert _snapshot(model) == before
