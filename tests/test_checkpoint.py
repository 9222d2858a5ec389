"""Checkpoints: exact resume mid-schedule, evaluation from a checkpoint, folding a checkpoint."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, synthetic_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn.utils import parametrize

from lightning_masks import MaskOptimizer, MaskPruningCallback, Schedule, fold_checkpoint, masked_tensors
from lightning_masks.masking import group_mask_keys, saved_keep


class Scheduled(TinyModule):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]


def fit(tmp_path, max_epochs, ckpt_path=None, module_cls=TinyModule, update_every="auto", **callback_kwargs):
    pl.seed_everything(0, verbose=False)
    module = module_cls()
    pruner = MaskPruningCallback(0.8, fold_on_fit_end=False, schedule=Schedule(end=4, update_every=update_every),
                                 **callback_kwargs)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[pruner, saver], deterministic=True,
                           enable_checkpointing=True)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, pruner, trainer


@pytest.mark.parametrize("module_cls, options", [(TinyModule, {"optimizer": MaskOptimizer(lr=0.05)}),
                                                 (Scheduled, {"optimizer": MaskOptimizer(lr=None, weight_decay=0.0)}),
                                                 (TinyModule, {"init": "wanda"})])
def test_resume_mid_schedule_reaches_the_same_masks_position_and_metrics(tmp_path, module_cls, options):
    """The scores' optimizer resumes too: its state, and (``lr=None``) the scheduled lr it follows; ``init="wanda"``'s
    input norms, which the resumed fit's gates (made before the load) take from the checkpoint."""
    whole, whole_pruner, whole_trainer = fit(tmp_path / "whole", 6, module_cls=module_cls, update_every=1,
                                             **options)
    checkpoint = tmp_path / "whole" / "epoch=1.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    [callback_state] = [v for k, v in state["callbacks"].items() if k.startswith("MaskPruningCallback")]
    assert 0 < callback_state["target"] < 0.8  # mid-schedule
    resumed, resumed_pruner, resumed_trainer = fit(tmp_path / "resumed", 6, ckpt_path=checkpoint,
                                                   module_cls=module_cls, update_every=1, **options)
    assert (resumed_pruner.plan.position, resumed_pruner.plan.target, resumed_pruner.plan.pruned) == (
        whole_pruner.plan.position, whole_pruner.plan.target, whole_pruner.plan.pruned)
    for a, b in zip(masked_tensors(whole), masked_tensors(resumed)):
        assert torch.equal(a.gate.keep, b.gate.keep)
        assert (a.gate.input_norm is None) == ("init" not in options)
        assert a.gate.input_norm is None or torch.equal(a.gate.input_norm, b.gate.input_norm)
        assert torch.allclose(a.gate.scores, b.gate.scores, atol=1e-6)
        assert torch.allclose(a.weight, b.weight, atol=1e-6)
    for key in ("train_loss", "val_loss"):
        assert resumed_trainer.callback_metrics[key] == pytest.approx(whole_trainer.callback_metrics[key].item(),
                                                                      abs=1e-6)


@pytest.fixture
def masked_checkpoint(tmp_path):
    """A checkpoint written mid-schedule and the masked model's predictions at that point."""
    module, _, trainer = fit(tmp_path, 3)
    path = tmp_path / "epoch=2.ckpt"
    x = next(iter(synthetic_loader(seed=1)))[0]
    return path, module(x).detach(), x


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_with_ckpt_path_restores_the_masks(masked_checkpoint, stage):
    path, expected, x = masked_checkpoint
    pl.seed_everything(1, verbose=False)
    module = TinyModule()  # plain and differently initialised
    trainer = make_trainer(callbacks=[MaskPruningCallback()])
    result = getattr(trainer, stage)(module, ckpt_path=path)
    assert result
    assert not any(parametrize.is_parametrized(m) for m in module.modules())  # folded back afterwards
    assert torch.allclose(module(x), expected, atol=1e-6)


def test_folded_checkpoint_loads_with_no_callback(masked_checkpoint, tmp_path):
    path, expected, x = masked_checkpoint
    plain_path = fold_checkpoint(path, tmp_path / "plain.ckpt")
    module = TinyModule.load_from_checkpoint(plain_path)
    assert not any(parametrize.is_parametrized(m) for m in module.modules())
    assert torch.allclose(module(x), expected, atol=1e-6)
    state = torch.load(path, weights_only=False)
    keep = [saved_keep(fields) for fields in group_mask_keys(state["state_dict"]).values() if "scores" in fields]
    weights = [module.net[0].weight, module.net[2].weight]
    assert [int((w == 0).sum()) for w in weights] == [int((~k).sum()) for k in keep]
    assert sum(int((~k).sum()) for k in keep) > 0


def test_corrupt_checkpoint_gets_a_clear_error_and_the_destination_is_kept(masked_checkpoint, tmp_path):
    path, _, _ = masked_checkpoint
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(path.read_bytes()[:500])
    destination = tmp_path / "plain.ckpt"
    destination.write_bytes(b"what the user had")
    with pytest.raises(ValueError, match=r"could not read checkpoint '.*corrupt.ckpt'.*pass a checkpoint file"):
        fold_checkpoint(corrupt, destination)
    assert destination.read_bytes() == b"what the user had"
    torch.save({"weights": torch.zeros(1)}, corrupt)
    with pytest.raises(ValueError, match=r"is not a Lightning checkpoint \(no 'state_dict'\)"):
        fold_checkpoint(corrupt, destination)
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == []
