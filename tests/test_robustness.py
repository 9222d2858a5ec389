"""Hostile inputs and faults: doctored checkpoints, interrupted fits, NaNs, foreign parametrizations, odd setups."""

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, synthetic_loader, zeros_and_total
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from lightning_masks import MaskLogging, MaskPruningCallback, MaskState, Schedule, attach, masked_tensors
from lightning_masks.masking import detach, group_mask_keys, resolve_targets, saved_keep


@pytest.fixture
def checkpoint(tmp_path):
    pl.seed_everything(0, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=1)), saver],
                           enable_checkpointing=True)
    trainer.fit(TinyModule())
    return tmp_path / "last.ckpt"


def doctored(checkpoint, tmp_path, change):
    state = torch.load(checkpoint, weights_only=False)
    change(state["state_dict"])
    path = tmp_path / "doctored.ckpt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda sd: sd.pop("net.0.parametrizations.weight.0.keep_bits"),
     r"'net.0.parametrizations.weight.0.keep_bits' is missing"),
    (lambda sd: sd.update({"net.2.parametrizations.weight.0.scores": torch.zeros(2, 2)}),
     r"'net.2.parametrizations.weight.0.scores' has shape \(2, 2\), the model has \(3, 16\)"),
    (lambda sd: sd.pop("net.0.parametrizations.weight.0.scores"),
     r"('net.0.parametrizations.weight.0.scores' is missing|is a mask tensor of a weight the model does not)"),
])
@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_doctored_checkpoint_is_refused_and_nothing_is_loaded(checkpoint, tmp_path, change, message, stage):
    path = doctored(checkpoint, tmp_path, change)
    pl.seed_everything(1, verbose=False)
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = make_trainer(max_epochs=3, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=1))])
    with pytest.raises(ValueError, match=message + r".*nothing was loaded"):
        getattr(trainer, stage)(module, ckpt_path=path)
    assert module.state_dict().keys() == before.keys()  # the model stays as the user had it
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


class Crash(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise RuntimeError("simulated crash")


def test_interrupted_fit_leaves_model_and_checkpoint_consistent(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    pruner = MaskPruningCallback(0.5, schedule=Schedule(end=2, update_every="epoch"))
    trainer = make_trainer(max_epochs=3, callbacks=[pruner, saver, Crash()], enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"fit ended at epoch 1, before the ramp's end at epoch 2: target sparsity "
                                         r"0.5 \(reached 43.75%\); the model is folded as it is"), \
            pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module)
    assert not masked_tensors(module) and parametrize._cache_enabled == 0  # folded whole, not half-folded
    pruned, total = zeros_and_total(module)
    assert pruned == round(0.5 * (1 - 0.5**3) * total)  # epoch 1 of cubic to 0.5 over 2
    fresh = TinyModule()
    make_trainer(callbacks=[MaskPruningCallback()]).validate(fresh, ckpt_path=tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    keep = saved_keep(group_mask_keys(state)["net.0.weight"])
    assert int((~keep).sum()) == int((fresh.net[0].weight == 0).sum())


def test_nan_appearing_during_training_is_named():
    class Poison(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.net[2].parametrizations.weight.original[0, 0] = float("nan")

    # an update after the poisoning finds it
    with pytest.raises(ValueError, match=r"mask importance of 'net.2.weight' is NaN"):
        make_trainer(max_epochs=3, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=2,
            update_every=1)), Poison()]).fit(
            TinyModule())


def test_foreign_parametrizations_and_hooks_are_left_dense_by_default_and_refused_when_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    parametrizations.weight_norm(model[0])
    assert resolve_targets(model).foreign == ["0 (already parametrized by ['_WeightNorm'] on 'weight')"]
    assert [e.name for e in attach(model)] == ["1.weight"]
    detach(model)
    with pytest.raises(ValueError, match=r"Linear '0' is already parametrized by \['_WeightNorm'\].*exclude=\['0'\]"):
        attach(model, targets=["0", "1"])
    assert [e.name for e in attach(model, targets=["1"])] == ["1.weight"]
    pruned = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(pruned[0], "weight", 0.5)
    with pytest.raises(ValueError, match=r"no maskable tensor found.*already pruned or normalised"):
        attach(pruned)
    with pytest.raises(ValueError, match=r"already pruned or normalised .*prune.remove"):
        attach(pruned, targets=[nn.Linear])
    prune.remove(pruned[0], "weight")
    assert len(attach(pruned)) == 1


def test_a_weight_normed_layer_in_a_fit_is_left_dense_with_a_warning(tiny_module):
    parametrizations.weight_norm(tiny_module.net[0])
    with pytest.warns(UserWarning, match=r"1 layers are left dense because something else already computes their "
                                         r"weight: net.0 \(already parametrized"):
        make_trainer(max_epochs=1, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=1),
                                                                  logging=MaskLogging(plots=False))]).fit(tiny_module)
    assert parametrize.is_parametrized(tiny_module.net[0], "weight") and not masked_tensors(tiny_module)


def test_model_without_maskable_weights_is_refused(tiny_module):
    tiny_module.net = nn.Sequential(nn.Flatten(), nn.Identity())
    tiny_module.head = nn.Embedding(3, 3)
    with pytest.raises(ValueError, match="no maskable tensor found"):
        make_trainer(max_epochs=1, callbacks=[MaskPruningCallback()]).fit(tiny_module)


@pytest.mark.parametrize("compact", [False, True])
def test_empty_dataloader_trains_nothing_and_leaves_a_plain_model(tiny_module, compact):
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 8), torch.zeros(0).long()))
    before = tiny_module.net[0].weight.detach().clone()
    make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(state=MaskState(compact=compact))]).fit(tiny_module,
                                                                                    train_dataloaders=empty)
    assert not masked_tensors(tiny_module)
    after = tiny_module.net[0].weight.detach()
    if not compact:
        assert torch.allclose(after, before)  # folded at init: the per-weight rescaled gate is 1
    else:  # one scale a tensor, 1 / mean(sigmoid(|w|)): the gate is 1 on average, sigmoid(|w|)/mean elsewhere
        gate = torch.sigmoid(before.abs().bfloat16().float())
        assert torch.allclose(after, before * gate / gate.mean(), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(after, before)


def test_fit_twice_leaks_no_hooks(tiny_module):
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False, schedule=Schedule(end=1))
    make_trainer(max_epochs=1, callbacks=[pruner]).fit(tiny_module)
    hooks = len(tiny_module._load_state_dict_pre_hooks)
    make_trainer(max_epochs=1, callbacks=[pruner]).fit(tiny_module)
    assert len(tiny_module._load_state_dict_pre_hooks) == hooks == 0


def exact(module, target):
    zeros, total = zeros_and_total(module)  # TinyModule's two Linear weights
    return zeros == round(target * total)


def test_bf16_mixed_precision_reaches_the_same_sparsity(tiny_module):
    pruner = MaskPruningCallback(0.7, schedule=Schedule(end=2))
    make_trainer(max_epochs=3, precision="bf16-mixed", callbacks=[pruner]).fit(tiny_module)
    assert exact(tiny_module, 0.7) and tiny_module.net[0].weight.dtype == torch.float32


def test_gradient_accumulation_and_clipping_with_step_cadence(tiny_module):
    pruner = MaskPruningCallback(0.6, schedule=Schedule("linear", end=1.0, update_every=2))
    make_trainer(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.5, callbacks=[pruner]).fit(tiny_module)
    assert pruner.plan.position == 2  # 4 optimizer steps in all; updates at steps 0 and 2
    assert exact(tiny_module, 0.6)


class Unlogged(TinyModule):
    """``self.log`` inside a compiled training_step does not trace in this torch/Lightning pair."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


@pytest.mark.parametrize("attach_first", [True, False])
def test_compiled_module_trains_with_masks(attach_first):
    pl.seed_everything(0, verbose=False)
    module = Unlogged()
    if attach_first:  # masks attached before compiling; the callback adopts them
        attach(module)
    compiled = torch.compile(module, backend="eager")
    pruner = MaskPruningCallback(0.5, schedule=Schedule(end=1))
    make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[pruner]).fit(compiled)
    assert exact(module, 0.5)
    x, _ = next(iter(synthetic_loader()))
    assert torch.allclose(compiled(x), module(x))
