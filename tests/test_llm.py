"""LLM workflows: activation-aware (Wanda) scores, starting from a one-shot pruner's zeros, MoE routers left whole,
PEFT/LoRA adapters over masked base weights. Tiny transformers configs, random weights."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, synthetic_loader
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_masks import MaskPruningCallback, masked_tensors


class Snapshot(Callback):
    """The scores and keep bits as training starts (after any data-dependent initialisation, before any update)."""

    def __init__(self) -> None:
        self.scores, self.keep = [], []

    def on_train_start(self, trainer, pl_module):
        if not self.scores:
            self.scores = [e.gate.scores.detach().float().clone() for e in masked_tensors(pl_module)]
            self.keep = [e.gate.keep.clone() for e in masked_tensors(pl_module)]


def one_shot(module: nn.Module, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    """Zero the smallest weights of each Linear in place, as a one-shot pruner leaves them; return the zeros."""
    zeros = {}
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, nn.Linear):
                cut = layer.weight.abs().flatten().kthvalue(int(sparsity * layer.weight.numel())).values
                layer.weight[layer.weight.abs() <= cut] = 0.0
                zeros[name] = layer.weight == 0
    return zeros


# ----------------------------------------------------------------------------------------- wanda
def test_wanda_scores_are_the_weights_times_the_dense_networks_input_rms_over_the_first_batches():
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    dense = TinyModule()
    dense.load_state_dict(module.state_dict())
    inputs = torch.cat([x for x, _ in list(synthetic_loader())[:2]])
    hidden = dense.net[1](dense.net[0](inputs)).detach()
    expected = [dense.net[0].weight.abs() * inputs.square().mean(0).sqrt(),
                dense.net[2].weight.abs() * hidden.square().mean(0).sqrt()]
    snapshot = Snapshot()
    make_trainer(max_steps=1, callbacks=[MaskPruningCallback(init="wanda", init_kwargs={"batches": 2}),
                                         snapshot]).fit(module)
    for got, want in zip(snapshot.scores, expected):
        assert torch.allclose(got, want.detach().to(torch.bfloat16).float(), rtol=1e-2, atol=1e-6)


# ----------------------------------------------------------------------------------------- one-shot zeros
def test_from_zeros_starts_from_a_one_shot_mask_that_training_weights_do_not_refill():
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    zeros = one_shot(module, 0.5)
    snapshot = Snapshot()
    make_trainer(max_epochs=3, callbacks=[MaskPruningCallback(sparsity=0.7, init="from_zeros"), snapshot]).fit(module)
    assert [(~keep).sum().item() for keep in snapshot.keep] == [z.sum().item() for z in zeros.values()]
    for name, zero in zeros.items():  # the one-shot zeros stayed zero; the masks pruned on from there to 70%
        weight = module.get_submodule(name).weight
        assert torch.all(weight[zero] == 0)
    pruned = sum((module.get_submodule(n).weight == 0).sum().item() for n in zeros)
    assert pruned == round(0.7 * sum(z.numel() for z in zeros.values()))


@pytest.mark.parametrize("granularity", ["element", "2:4"])
def test_from_zeros_fixed_holds_the_one_shot_mask_while_the_kept_weights_train(granularity):
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    if granularity == "2:4":
        with torch.no_grad():
            for layer in (module.net[0], module.net[2]):
                groups = layer.weight.view(-1, 4)
                groups.scatter_(1, groups.abs().topk(2, dim=1, largest=False).indices, 0.0)
        zeros = {n: module.get_submodule(n).weight == 0 for n in ("net.0", "net.2")}
    else:
        zeros = one_shot(module, 0.6)
    before = {n: module.get_submodule(n).weight.detach().clone() for n in zeros}
    pruner = MaskPruningCallback(init="from_zeros", init_kwargs={"fixed": True}, granularity=granularity)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(module)
    for name, zero in zeros.items():
        weight = module.get_submodule(name).weight
        assert torch.equal(weight == 0, zero)  # the same zeros, no more
        assert not torch.equal(weight, before[name])  # the kept weights trained
    assert pruner.pruned == sum(z.sum().item() for z in zeros.values())  # what the fit reports as pruned
