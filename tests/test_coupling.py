"""coupled_channels: the layers whose output channels meet in residual sums, as tie groups."""

import pytest
import torch
from torch import nn

from lightning_masks.selection import coupled_channels
from lightning_masks.zoo.models import ResNet20


def test_the_batchnorms_writing_each_residual_stream_of_a_projection_resnet():
    model = ResNet20(in_channels=1, width=4, blocks=2, shortcut="projection")
    assert coupled_channels(model, torch.randn(2, 1, 8, 8)) == [
        ["net.1.weight", "net.3.body.4.weight", "net.4.body.4.weight"],  # stem BN and each block's second BN
        ["net.5.body.4.weight", "net.5.shortcut.1.weight", "net.6.body.4.weight"],  # the shortcut's BN from here
        ["net.7.body.4.weight", "net.7.shortcut.1.weight", "net.8.body.4.weight"],
    ]
    assert model.training  # the trace ran in eval mode and left the mode as it was


def test_channels_joined_by_position_through_a_pad_are_refused():
    with pytest.raises(ValueError, match=r"'net.1': 4, .*'net.5.body.4': 8.* differ in number.*channel pad"):
        coupled_channels(ResNet20(in_channels=1, width=4, blocks=2), torch.randn(2, 1, 8, 8))


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(5, 6), nn.Linear(6, 2)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)) for _ in range(2))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_any_layer_type_can_be_grouped_and_unshared_layers_are_left_out():
    model = ResidualMLP()
    assert coupled_channels(model, torch.randn(3, 5)) == []  # no BatchNorm at all
    assert coupled_channels(model, torch.randn(3, 5), layers=(nn.Linear,)) == [
        ["embed.weight", "blocks.0.2.weight", "blocks.1.2.weight"]]  # not the hidden layers, nor the head
