"""The state-dict layout (layout.py) is the one torch writes for our gates: keys built and split there round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_masks import attach
from lightning_masks.masking import GATE_FIELDS, ORIGINAL, REQUIRED_FIELDS, group_mask_keys, mask_key, split_mask_key


@pytest.mark.parametrize("options", [{}, {"rescale": True}, {"rescale": True, "compact": True},
                                     {"per_channel": True, "rescale": True}])
def test_every_masked_key_torch_writes_is_built_and_split_by_the_layout(options):
    root = nn.Linear(3, 3)  # a root module's tensor has no path before "parametrizations"
    attach(root, **options)
    nested = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Conv1d(3, 2, 1)))
    attach(nested, **options)
    for model in (root, nested):
        state = model.state_dict()
        grouped = group_mask_keys(state)
        assert grouped, "no masked key recognised"
        for tensor, fields in grouped.items():
            for field, value in fields.items():
                assert state[mask_key(tensor, field)] is value
                assert split_mask_key(mask_key(tensor, field)) == (tensor, field)
            if tensor.endswith("weight"):
                assert set(REQUIRED_FIELDS) <= set(fields) <= {ORIGINAL, *GATE_FIELDS}
            else:  # a channel-gated bias saves its original only
                assert set(fields) == {ORIGINAL}
        plain = {key for key in state if split_mask_key(key) is None}
        assert plain == {key for key in state if ".parametrizations." not in "." + key}


class Shift(nn.Module):
    """Another parametrization with state of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scores", torch.zeros(()))  # named like ours: only its index tells them apart

    def forward(self, weight):
        return weight + self.scores


def test_another_parametrizations_fields_keep_their_index():
    layer = nn.Linear(2, 2)
    attach(layer)
    nn.utils.parametrize.register_parametrization(layer, "weight", Shift())  # stacked after ours, at index 1
    fields = group_mask_keys(layer.state_dict())["weight"]
    assert fields["scores"].shape == (2, 2) and fields["1.scores"].shape == ()
    assert torch.equal(fields[ORIGINAL], layer.parametrizations.weight.original)
    for field in fields:
        assert split_mask_key(mask_key("weight", field)) == ("weight", field)
