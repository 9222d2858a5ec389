"""masking/sharded.py in one process: the gate state held as parameters changes neither keys, values nor function;
unsharded entries are their own local views. The sharded runs themselves are in tests/test_fsdp.py."""

import pytest
import torch
from torch import nn

from lightning_masks import Selector, attach, fold, masked_tensors
from lightning_masks.masking import is_sharded, local_entries, shard_with_weights
from lightning_masks.masking.sharded import mask_state_bytes


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("compact", [False, True])
def test_gate_state_as_parameters_keeps_keys_values_and_function(compact):
    plain, held = net(), net()
    for model in (plain, held):
        masked = attach(model, rescale=True, compact=compact)
        Selector()(masked, 0.6)
    shard_with_weights(masked_tensors(held))
    gate = masked_tensors(held)[0].gate
    per_unit = {name for name, t in gate.named_parameters() if not t.requires_grad}
    assert per_unit == ({"keep_bits"} if compact else {"keep_bits", "gate_scale"})  # 0-dim buffers stay buffers
    assert gate.keep_bits is gate._parameters["keep_bits"]  # packed by rows: sharded along dim 0 with the scores
    a, b = plain.state_dict(), held.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # (parameters are listed first)
    x = torch.randn(4, 6)
    assert torch.equal(plain(x), held(x))
    Selector()(masked_tensors(held), 0.8)  # selection writes the held keep bits
    Selector()(masked_tensors(plain), 0.8)
    assert all(torch.equal(p.gate.keep, h.gate.keep) for p, h in zip(masked_tensors(plain), masked_tensors(held)))
    assert torch.equal(fold(plain)(x), fold(held)(x))


def test_unsharded_entries_are_their_own_local_views():
    masked = attach(net(), compact=False)
    assert not is_sharded(masked) and local_entries(masked) == masked
    # scores, the keep bits (a byte for each row of up to 8 entries: 5 rows of 6, 3 rows of 5), T
    assert mask_state_bytes(masked) == sum(e.gate.scores.numel() * 4 + 4 for e in masked) + 5 + 3
