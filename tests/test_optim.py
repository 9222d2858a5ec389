"""Placing the mask scores into existing optimizers, without a Trainer."""

import pytest
import torch
from helpers import make_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_masks import MaskPruningCallback, attach
from lightning_masks.lightning.optim import place_scores


def ids(params):
    return {id(p) for p in params}


def test_scores_missing_from_the_optimizer_join_the_group_of_their_weight():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    weights_only = [model[0].weight, model[1].weight]
    optimizer = torch.optim.SGD([{"params": weights_only, "lr": 0.3, "weight_decay": 0.1}])
    masked = attach(model)
    place_scores([optimizer], [], masked)
    [weights, scores] = optimizer.param_groups
    assert ids(scores["params"]) == ids(e.gate.scores for e in masked)
    assert (scores["lr"], scores["weight_decay"]) == (0.3, 0.1)
    assert ids(weights["params"]) == ids(weights_only)


def test_own_group_takes_the_scores_out_of_the_user_group_and_extends_schedulers():
    model = nn.Linear(3, 3)
    masked = attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    place_scores([optimizer], [scheduler], masked, lr=0.1, weight_decay=0.0)
    user, scores = optimizer.param_groups
    assert ids(scores["params"]) == ids([masked[0].gate.scores]) and not ids(user["params"]) & ids(scores["params"])
    assert (scores["lr"], scores["weight_decay"]) == (0.1, 0.0)
    optimizer.step()
    scheduler.step()
    assert scores["lr"] == 0.05 and user["lr"] == 5e-4


def test_scores_already_trained_are_left_alone_without_options():
    model = nn.Linear(3, 3)
    masked = attach(model)
    optimizer = torch.optim.Adam(model.parameters())
    place_scores([optimizer], [], masked)
    assert len(optimizer.param_groups) == 1
    assert ids([masked[0].gate.scores]) <= ids(optimizer.param_groups[0]["params"])


def test_the_fused_adam_switch_is_an_explicit_callback_setting(tiny_module):
    seen = {}

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["fused"] = [group.get("fused") for group in trainer.optimizers[0].param_groups]

    for fused_adam, expected in ((True, True), (False, None)):
        make_trainer(max_steps=1, callbacks=[MaskPruningCallback(0.5, fused_adam=fused_adam), Spy()]).fit(tiny_module)
        assert seen["fused"] and all(flag is expected for flag in seen["fused"]), (fused_adam, seen)
    with pytest.raises(ValueError, match="fused_adam must be True or False, got 'yes'"):
        MaskPruningCallback(fused_adam="yes")
