"""Input feature norms gathered by forward hooks (Wanda's ||x_j||), per layer kind."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_masks import attach
from lightning_masks.masking import input_norms


def rms(rows: torch.Tensor) -> torch.Tensor:
    return rows.square().mean(0).sqrt()


@pytest.mark.parametrize("layer, inputs, features, shape", [
    (nn.Linear(6, 4), torch.randn(3, 5, 6), lambda x: x.reshape(-1, 6), (1, 6)),
    (Conv1D(4, 6), torch.randn(3, 5, 6), lambda x: x.reshape(-1, 6), (6, 1)),
    (nn.Conv2d(6, 4, 3), torch.randn(2, 6, 5, 5), lambda x: x.movedim(1, -1).reshape(-1, 6), (1, 6, 1, 1)),
    (nn.ConvTranspose2d(6, 4, 2), torch.randn(2, 6, 5, 5), lambda x: x.movedim(1, -1).reshape(-1, 6), (6, 1, 1, 1)),
])
def test_each_input_features_rms_over_every_pass_broadcasts_on_the_weight(layer, inputs, features, shape):
    net = nn.Sequential(layer)
    masked = attach(net)
    with input_norms(masked) as norms:
        net(inputs[:1])
        net(inputs[1:])
    got = norms.rms("0.weight")
    assert got.shape == shape
    assert torch.allclose(got.reshape(-1), rms(features(inputs)), rtol=1e-5)
    assert not net[0]._forward_pre_hooks  # the hooks are gone after the block


def test_a_tensor_shared_by_two_layers_sums_both_inputs():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    net = nn.Sequential(first, second)
    masked = attach(net)
    x = torch.randn(4, 3)
    with input_norms(masked) as norms:
        hidden = first(x)
        second(hidden)
    assert torch.allclose(norms.rms(masked[0].name).reshape(-1), rms(torch.cat([x, hidden.detach()])), rtol=1e-5)


def test_layers_whose_inputs_map_to_no_weight_axis_are_refused_by_name():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"not '0.weight' \(.*Conv2d.weight.*exclude=\['0.weight'\]"), \
            input_norms(attach(net)):
        pass


def test_a_layer_that_saw_no_input_is_named():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    masked = attach(net)
    with input_norms(masked) as norms:
        net[0](torch.randn(2, 3))
    with pytest.raises(ValueError, match="'1.weight' saw no input"):
        norms.rms("1.weight")
