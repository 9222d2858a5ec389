"""The mask state a masked weight carries, counted from the tensors themselves, and the packed keep bits."""

import pytest
import torch
from helpers import make_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_masks
from lightning_masks import (
    MaskGate,
    MaskLogging,
    MaskPruningCallback,
    MaskState,
    Schedule,
    Selector,
    attach,
    fold,
    masked_tensors,
)
from lightning_masks.masking import masked_value, restore_masks_on_load
from lightning_masks.masking.gate import gated


class Wide(lightning_masks.lightning.callback.pl.LightningModule):
    """Two 256-wide Linear layers trained with AdamW: per-tensor constants are then negligible per weight."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=16)


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


class StateBytes(Callback):
    """After an optimizer step (gradients still held), the bytes of each gate's scores, their gradient, their
    optimizer state and the gate's buffers (the packed keep bits, temperature and scale), split into per-weight
    tensors (sized by the number of entries) and per-tensor constants (one value)."""

    def __init__(self) -> None:
        self.per_weight = self.per_tensor = self.weights = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx != 2 or trainer.current_epoch:  # the ramp has pruned entries by then (update_every=1)
            return
        [pruner] = [c for c in trainer.callbacks if isinstance(c, MaskPruningCallback)]
        optimizers = [*pruner.score_optimizers, *trainer.optimizers]  # the scores' copy of AdamW holds their state
        for entry in masked_tensors(pl_module):
            gate = entry.gate
            [state] = [o.state[gate.scores] for o in optimizers if o.state.get(gate.scores)]
            assert gate.scores.grad is not None
            tensors = [gate.scores, gate.scores.grad, *state.values(), *gate.buffers()]
            for tensor in tensors:
                if tensor.dim():
                    self.per_weight += nbytes(tensor)
                else:
                    self.per_tensor += nbytes(tensor)
            self.weights += entry.numel


def state_bytes(**options) -> StateBytes:
    counter = StateBytes()
    pruner = MaskPruningCallback(0.9, fold_on_fit_end=False, schedule=Schedule(end=1, update_every=1),
                                 logging=MaskLogging(plots=False), **options)
    make_trainer(max_epochs=2, callbacks=[pruner, counter]).fit(Wide(), loader())
    return counter


def test_the_defaults_keep_8_and_an_eighth_bytes_a_masked_weight_where_float32_state_keeps_20():
    default = state_bytes()
    # bfloat16 scores (2) + their gradient (2) + AdamW's two moments in the scores' dtype (2 + 2), the keep bits
    # packed eight a byte (1/8); one scale a tensor
    assert default.per_weight * 8 == 65 * default.weights
    assert default.per_tensor <= 12 * 3  # per tensor: temperature, scale, Adam's step (float32 scalars)
    assert (default.per_weight + default.per_tensor) / default.weights <= 8.25
    # float32 scores, gradient and moments (16), the packed keep bits (1/8) and a float32 scale a weight (4)
    wide = state_bytes(state=MaskState(score_dtype="float32", compact=False))
    assert wide.per_weight * 8 == 161 * wide.weights


def test_regrow_keeps_the_default_state():
    counter = state_bytes(selector=Selector(regrow=True))
    assert counter.per_weight * 8 == 65 * counter.weights  # the pruned entries keep their scores: nothing more


def test_score_dtype_is_checked_and_named():
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        MaskPruningCallback(state=MaskState(score_dtype="float16"))
    assert MaskPruningCallback(state=MaskState(score_dtype="torch.float32")).state.score_dtype is torch.float32
    assert MaskPruningCallback(state=MaskState(score_dtype=None)).state.score_dtype is None
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        attach(nn.Linear(3, 3), score_dtype=torch.float16)


def pruned_layer(pruned_every: int = 3, dtype=torch.bfloat16, rescale=True):
    torch.manual_seed(0)
    layer = nn.Linear(12, 8)
    [entry] = attach(layer, rescale=rescale, score_dtype=dtype, compact=True)
    keep = torch.ones(entry.numel, dtype=torch.bool)
    keep[::pruned_every] = False
    entry.gate.set_keep(keep)
    return layer, entry, keep.view(8, 12)


def test_the_keep_bits_are_packed_along_rows_apart_from_the_scores():
    layer, entry, keep = pruned_layer()
    gate = entry.gate
    assert gate.keep_bits.dtype == torch.uint8 and gate.keep_bits.shape == (8, 2)  # 12 bits a row: two bytes
    assert torch.equal(gate.keep, keep) and not isinstance(gate.keep_bits, nn.Parameter)
    assert torch.equal(gate.keep_bits[:4], gate.keep_bits[:4])  # a block of rows holds its rows' bits
    assert gate.scores.dtype == torch.bfloat16 and gate.gate_scale.dim() == 0
    assert torch.all(gate.scores[~keep] > -10)  # a pruned entry keeps its score
    assert torch.all(layer.weight[~keep] == 0) and torch.all(layer.weight[keep] != 0)
    # the gate is computed in the weight's float32 from the bfloat16 scores, times the per-tensor scale
    w, s = entry.weight.detach(), gate.scores.detach()
    expected = torch.where(keep, w * torch.sigmoid(s.float()) * gate.gate_scale, 0.0)
    assert torch.allclose(layer.weight, expected, rtol=1e-6, atol=0) and layer.weight.dtype == torch.float32
    with torch.no_grad():  # the fold formula gives the live gate's values bit for bit
        assert torch.equal(masked_value(entry.weight, gate.scores, gate.keep, gate.temperature, gate.gate_scale),
                           layer.weight)


def test_pruned_entries_get_no_gradient_and_bfloat16_score_gradients():
    layer, entry, keep = pruned_layer()
    layer(torch.randn(5, 12)).square().sum().backward()
    grad = entry.gate.scores.grad
    assert grad.dtype == torch.bfloat16 and torch.all(grad[~keep] == 0) and torch.all(grad[keep] != 0)
    assert torch.all(entry.weight.grad[~keep] == 0)
    # against autograd's chain on the float32 formula, rounded to bfloat16
    w = entry.weight.detach().clone().requires_grad_()
    s = entry.gate.scores.detach().float().requires_grad_()
    x = torch.randn(5, 12)
    out = gated(w, s, keep, 1.0, entry.gate.gate_scale)
    (x @ out.t()).sum().backward()
    entry.gate.scores.grad = entry.weight.grad = None
    (x @ layer.weight.t()).sum().backward()
    assert torch.allclose(entry.gate.scores.grad.float(), s.grad.bfloat16().float(), rtol=1e-2, atol=0)
    assert torch.allclose(entry.weight.grad, w.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
])
def test_pruned_entries_stay_pruned_under_weight_decay(optimizer):
    layer, entry, keep = pruned_layer()
    opt = optimizer([entry.gate.scores, entry.weight])
    for _ in range(200):
        opt.zero_grad()
        layer(torch.randn(4, 12)).square().sum().backward()
        opt.step()
    assert torch.isfinite(entry.gate.scores).all()
    assert torch.equal(entry.gate.keep, keep) and torch.all(layer.weight[~keep] == 0)


def test_state_dict_holds_the_packed_keep_bits_and_round_trips():
    layer, entry, keep = pruned_layer()
    state = layer.state_dict()
    assert set(state) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.scores",
                          "parametrizations.weight.0.keep_bits", "parametrizations.weight.0.temperature",
                          "parametrizations.weight.0.gate_scale"}
    assert torch.equal(state["parametrizations.weight.0.keep_bits"], entry.gate.keep_bits)
    fresh = nn.Linear(12, 8)
    [other] = attach(fresh, rescale=True, score_dtype=torch.bfloat16, compact=True)
    fresh.load_state_dict(state)
    assert torch.equal(other.gate.keep, keep) and torch.equal(fresh.weight, layer.weight)
    # into a plain model: the gate is restored compact, with bfloat16 scores
    plain = nn.Linear(12, 8)
    restore_masks_on_load(plain)
    plain.load_state_dict(state)
    [restored] = masked_tensors(plain)
    assert restored.gate.compact and restored.gate.scores.dtype == torch.bfloat16
    assert torch.equal(plain.weight, layer.weight)
    bad = dict(state, **{"parametrizations.weight.0.keep_bits": torch.ones(5, dtype=torch.uint8)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(bad)
    fold(layer)
    assert torch.equal(layer.weight == 0, ~keep)


def test_a_channel_gate_zeroes_weight_rows_and_bias():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    [entry] = attach(layer, rescale=True, per_channel=True, score_dtype=torch.bfloat16, compact=True)
    entry.gate.set_keep(torch.tensor([True, False, True, False]))
    assert entry.gate.keep_bits.shape == (4, 1)
    assert torch.all(layer.weight[1::2] == 0) and torch.all(layer.bias[1::2] == 0)
    assert torch.all(layer.weight[0::2] != 0) and torch.all(layer.bias[0::2] != 0)
    value = layer.weight.detach().clone()
    fold(layer)
    assert torch.equal(layer.weight, value)


def test_a_mask_gate_refuses_float16_scores():
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        MaskGate(torch.zeros(3), score_dtype=torch.float16)


def test_regrowth_brings_back_a_pruned_entry_with_its_score():
    torch.manual_seed(0)
    masked = attach(nn.Sequential(nn.Linear(4, 4)), score_dtype=torch.bfloat16, compact=True)
    gate, select = masked[0].gate, Selector(regrow=True, importance="gate")
    select(masked, 0.5)
    pruned = ~gate.keep
    with torch.no_grad():
        gate.scores[pruned] = 100.0  # the loss raised the pruned entries' scores
    select(masked, 0.5)
    assert torch.equal(gate.keep, pruned)


def test_keep_bits_are_cached_within_a_selection_until_they_change():
    from lightning_masks.masking import keep_bits_cached

    _, entry, keep = pruned_layer()
    gate = entry.gate
    assert gate.keep is not gate.keep  # unpacked afresh each time outside the block
    with keep_bits_cached([entry]):
        first = gate.keep
        assert gate.keep is first and torch.equal(first, keep)
        gate.set_keep(torch.zeros(entry.numel, dtype=torch.bool))  # the bits change in place: read afresh
        assert gate.keep is not first and not gate.keep.any()
    assert gate._keep_cache is None and not gate.keep.any()
