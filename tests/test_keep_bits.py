"""Pruned stays pruned whatever is done to the parameters: the keep bits live apart from them (packed, uint8).

Each manipulation users apply to a model's parameters (a WGAN critic's clamp, casts, true half precision, weight
decay, weight averages, loading an edited state dict) leaves every pruned entry an exact zero and the reached
sparsity the target.
"""

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import nn

from lightning_masks import MaskPruningCallback, Selector, fold, masked_tensors
from lightning_masks.masking import pack_rows, unpack_rows
from lightning_masks.masking.bits import packed_shape

TARGET = 0.8


class Critic(TinyModule):
    """A WGAN critic's habit: every parameter clamped to ``[-c, c]`` after each optimizer step (Arjovsky et al. 2017),
    here with AdamW's weight decay on every parameter too (``eps``: float16 training needs one it can hold)."""

    def __init__(self, clamp: float | None = None, weight_decay: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(hidden=24)
        self.clamp, self.weight_decay, self.eps = clamp, weight_decay, eps

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.clamp is not None:
            for p in self.parameters():
                p.data.clamp_(-self.clamp, self.clamp)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=self.weight_decay, eps=self.eps)


def pruned_weights(module: nn.Module) -> tuple[int, int]:
    """(exact zeros, entries) of the Linear weights."""
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


FITS = {
    "clamp": ({"clamp": 0.01}, {}, {}),
    "weight_decay": ({"weight_decay": 10.0}, {}, {}),
    "16-true": ({"eps": 1e-4}, {"precision": "16-true"}, {}),
    "bf16-true": ({}, {"precision": "bf16-true"}, {}),
    "swa": ({}, {}, {"swa": True}),
}


@pytest.mark.parametrize("kind", list(FITS))
def test_a_fit_under_parameter_manipulations_reaches_its_target_with_exact_zeros(kind):
    module_options, trainer_options, extra = FITS[kind]
    pl.seed_everything(0, verbose=False)
    module = Critic(**module_options)
    callbacks: list[Callback] = [MaskPruningCallback(TARGET)]
    if extra.get("swa"):  # the average of weights and scores replaces the model at the end
        callbacks.append(StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=2))
    make_trainer(max_epochs=4, callbacks=callbacks, **trainer_options).fit(module)
    pruned, total = pruned_weights(module)
    assert pruned == round(TARGET * total), f"{kind}: {pruned / total:.2%} of the weights are zero"


def masked_fit() -> TinyModule:
    """A module fitted to the target, its masks left on."""
    pl.seed_everything(0, verbose=False)
    module = Critic()
    make_trainer(max_epochs=3, callbacks=[MaskPruningCallback(TARGET, fold_on_fit_end=False)]).fit(module)
    return module


def edited_state_dict(module: nn.Module) -> None:
    """A user loads back a state dict whose floating-point tensors were edited (clamped)."""
    state = {k: v.clamp(-0.01, 0.01) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    module.load_state_dict(state)


CASTS = {
    "clamp": lambda m: [p.data.clamp_(-0.01, 0.01) for p in m.parameters()],
    "half": lambda m: m.half(),
    "to_bfloat16": lambda m: m.to(torch.bfloat16),
    "to_float64": lambda m: m.to(torch.float64),
    "load_state_dict": edited_state_dict,
}


@pytest.mark.parametrize("kind", list(CASTS))
def test_pruned_stays_pruned_under_casts_clamps_and_loads_and_the_next_update_works(kind):
    module = masked_fit()
    masked = masked_tensors(module)
    keeps = [entry.gate.keep.clone() for entry in masked]
    CASTS[kind](module)
    for entry, keep in zip(masked, keeps):
        assert torch.equal(entry.gate.keep, keep) and entry.gate.keep_bits.dtype == torch.uint8
        assert torch.all(getattr(*entry.owners[0])[~keep] == 0)
    Selector()(masked, 0.9)  # the next update, in the scores' new dtype
    for entry, keep in zip(masked, keeps):
        assert not torch.any(entry.gate.keep & ~keep)  # nothing revived
    fold(module)
    pruned, total = pruned_weights(module)
    assert pruned == round(0.9 * total)


@pytest.mark.parametrize("shape", [(5,), (3, 17), (2, 3, 8), (4, 1, 1, 1), (6, 9), (16, 8, 3, 3)])
def test_packed_rows_round_trip_and_a_block_of_rows_holds_its_own_bits(shape):
    generator = torch.Generator().manual_seed(len(shape))
    bits = torch.rand(shape, generator=generator) > 0.5
    packed = pack_rows(bits)
    assert packed.dtype == torch.uint8 and packed.shape == packed_shape(shape)
    assert packed.numel() <= bits.numel() / 8 + (shape[0] if len(shape) > 1 else 1)  # at most a byte a row of padding
    assert torch.equal(unpack_rows(packed, shape), bits)
    if len(shape) > 1:  # a shard of dim 0 (FSDP2) unpacks to its rows
        assert torch.equal(unpack_rows(packed[1:], (shape[0] - 1, *shape[1:])), bits[1:])
