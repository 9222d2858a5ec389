"""The callback beside the callbacks and tools users run with it, and a lifecycle that holds across fits.

Lightning's own callbacks (StochasticWeightAveraging, BackboneFinetuning, EarlyStopping, ModelCheckpoint), each in
the callback order that failed before.
"""

import copy
import time

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, zeros_and_total
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, EarlyStopping, StochasticWeightAveraging
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel

from lightning_masks import MaskPruningCallback, MaskState, Schedule, attach, fold, get_initializer, masked_tensors
from lightning_masks.masking.initializers import Wanda


def plain(module):
    return not any(parametrize.is_parametrized(m) for m in module.modules())


# ------------------------------------------------------------------------------------------ copies
@pytest.mark.parametrize("swa_first", [True, False])
def test_stochastic_weight_averaging_in_either_order(tiny_module, swa_first):
    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
    pruner = MaskPruningCallback(0.5, schedule=Schedule(end=1))
    make_trainer(max_epochs=3, callbacks=[swa, pruner] if swa_first else [pruner, swa]).fit(tiny_module)
    assert plain(tiny_module)
    assert zeros_and_total(tiny_module)[0] == round(0.5 * zeros_and_total(tiny_module)[1])
    average = swa._average_model  # masked like the module, so its parameters were averaged pairwise
    assert len(masked_tensors(average)) == 2
    x = torch.randn(4, 8)
    assert torch.allclose(fold(copy.deepcopy(average))(x), tiny_module(x), atol=1e-6)


class EMA(Callback):
    """An exponential moving average of the model, as users write it with torch.optim.swa_utils.AveragedModel."""

    def __init__(self, copy_at="setup"):
        self.copy_at, self.ema = copy_at, None

    def setup(self, trainer, pl_module, stage):
        if self.copy_at == "setup":
            self.ema = AveragedModel(pl_module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))

    def on_train_start(self, trainer, pl_module):
        if self.copy_at == "train_start":
            self.ema = AveragedModel(pl_module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.ema.update_parameters(pl_module)


@pytest.mark.parametrize("copy_at", ["setup", "train_start"])
def test_ema_averaged_model_follows_the_masks(tiny_module, copy_at):
    ema = EMA(copy_at)
    pruner = MaskPruningCallback(0.5, schedule=Schedule(end=1))
    make_trainer(max_epochs=3, callbacks=[ema, pruner]).fit(tiny_module)
    averaged = ema.ema.module
    keep = [e.gate.keep for e in masked_tensors(averaged)]
    assert len(keep) == 2 and sum(int((~k).sum()) for k in keep) == round(0.5 * zeros_and_total(tiny_module)[1])
    folded = fold(copy.deepcopy(averaged))  # the averaged copy folds to the same zeros as the model
    assert [torch.equal(a.weight == 0, b.weight == 0) for a, b in zip(folded.net[::2], tiny_module.net[::2])] == [
        True, True]


def test_deepcopy_during_fit_after_fit_and_after_fold(tiny_module):
    x = torch.randn(4, 8)
    copies = []

    class Copier(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            copies.append((copy.deepcopy(pl_module), pl_module(x).detach()))

        def on_validation_end(self, trainer, pl_module):  # gates cached in evaluation loops
            copies.append((copy.deepcopy(pl_module), pl_module(x).detach()))

    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False, schedule=Schedule(end=1))
    make_trainer(max_epochs=2, callbacks=[pruner, Copier()]).fit(tiny_module)
    for replica, expected in copies:
        assert torch.allclose(replica(x), expected)
    after_fit = copy.deepcopy(tiny_module)
    assert torch.allclose(after_fit(x), tiny_module(x)) and len(masked_tensors(after_fit)) == 2
    fold(tiny_module)
    assert torch.allclose(copy.deepcopy(tiny_module)(x), after_fit(x), atol=1e-6)


# ------------------------------------------------------------------------------------------ finetuning
class Backboned(TinyModule):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
        self.net = nn.Linear(40, 3)
        self.frozen = nn.Linear(8, 8)  # frozen by the user: stays unmasked
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.net(self.backbone(x + self.frozen(x) * 0))

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-2)


@pytest.mark.parametrize("finetuning_first", [True, False])
def test_backbone_frozen_by_finetuning_is_masked_in_either_order(finetuning_first, monkeypatch):
    pl.seed_everything(0, verbose=False)
    module = Backboned()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=2)
    pruner = MaskPruningCallback(0.7, schedule=Schedule(end=3))
    callbacks = [finetuning, pruner] if finetuning_first else [pruner, finetuning]
    said = []
    monkeypatch.setattr("lightning_masks.lightning.fit_report.rank_zero_info", said.append)
    make_trainer(max_epochs=5, callbacks=callbacks).fit(module)
    backbone = [module.backbone[0].weight, module.backbone[2].weight]
    total = sum(w.numel() for w in backbone) + module.net.weight.numel()
    pruned = sum(int((w == 0).sum()) for w in backbone) + int((module.net.weight == 0).sum())
    assert pruned == round(0.7 * total)
    assert all(int((w == 0).sum()) > 0.3 * w.numel() for w in backbone)
    assert not (module.frozen.weight == 0).any() and not module.frozen.weight.requires_grad
    assert any("frozen tensors (requires_grad=False at setup) left dense: frozen.weight; to learn masks over them"
               in line for line in said)


class FrozenBackbone(TinyModule):
    """A pretrained backbone frozen by hand (``requires_grad_(False)``) under a new head; the optimizer holds the head
    only, or every trainable parameter (the scores included)."""

    def __init__(self, head_only=True):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(40, 3)
        self.head_only = head_only

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        params = self.head.parameters() if self.head_only else filter(lambda p: p.requires_grad, self.parameters())
        return torch.optim.Adam(params, lr=1e-2)


@pytest.mark.parametrize("head_only", [True, False])
def test_frozen_mask_learns_masks_over_weights_frozen_by_hand_and_keeps_them_bit_for_bit(head_only, monkeypatch):
    pl.seed_everything(0, verbose=False)
    module = FrozenBackbone(head_only)
    before = [module.backbone[i].weight.detach().clone() for i in (0, 2)]
    pruner = MaskPruningCallback(0.8, exclude=["head", "net.*"], frozen="mask", schedule=Schedule(end=3))
    scores = []

    class Watch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            scores.append([e.gate.scores.detach().float().clone() for e in masked_tensors(pl_module)])

    said = []
    monkeypatch.setattr("lightning_masks.lightning.fit_report.rank_zero_info", said.append)
    make_trainer(max_epochs=4, callbacks=[pruner, Watch()]).fit(module)
    assert plain(module)
    weights = [module.backbone[i].weight for i in (0, 2)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))  # exact count
    for weight, original in zip(weights, before):  # the kept weights bit for bit, exact zeros elsewhere
        kept = weight != 0
        assert not weight.requires_grad and torch.equal(weight[kept], original[kept])
    first, last = scores[0], scores[-1]
    assert all(not torch.equal(a[a > -1e30], b[a > -1e30]) for a, b in zip(first, last))  # the scores learned
    assert any("frozen tensors under binary masks, their kept weights kept bit for bit (frozen='mask'): "
               "backbone.*.weight (x2)" in line for line in said)


def test_frozen_mask_masks_what_finetuning_freezes_and_trains_the_scores_while_frozen():
    pl.seed_everything(0, verbose=False)
    module = Backboned()
    frozen = [module.backbone[0], module.backbone[2], module.frozen]  # by the finetuning callback, and by hand
    before = [layer.weight.detach().clone() for layer in frozen]
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=10)  # never unfrozen in this fit
    pruner = MaskPruningCallback(0.7, frozen="mask", schedule=Schedule(end=3))
    trained = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            trained.append(all(e.gate.scores.grad is not None for e in masked_tensors(pl_module)))

    make_trainer(max_epochs=4, callbacks=[finetuning, pruner, Watch()]).fit(module)
    assert all(trained)  # every mask's scores got a gradient at every step, the frozen weights' included
    weights = [layer.weight for layer in frozen] + [module.net.weight]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.7 * sum(w.numel() for w in weights))
    for layer, original in zip(frozen, before):
        kept = layer.weight != 0
        assert torch.equal(layer.weight[kept], original[kept])
    assert all(int((layer.weight == 0).sum()) > 0 for layer in frozen[:2])


def test_gradient_initializers_score_frozen_weights():
    pl.seed_everything(0, verbose=False)
    module = FrozenBackbone()
    pruner = MaskPruningCallback(0.8, init="snip", exclude=["head", "net.*"], frozen="mask", schedule=Schedule(end=1))
    make_trainer(max_epochs=2, limit_train_batches=2, callbacks=[pruner]).fit(module)
    weights = [module.backbone[i].weight for i in (0, 2)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    assert not any(w.requires_grad for w in weights)


def test_frozen_gate_learns_soft_gates_over_frozen_weights_and_folds_them_in(monkeypatch):
    pl.seed_everything(0, verbose=False)
    module = FrozenBackbone()
    before = [module.backbone[i].weight.detach().clone() for i in (0, 2)]
    said = []
    monkeypatch.setattr("lightning_masks.lightning.fit_report.rank_zero_info", said.append)
    pruner = MaskPruningCallback(0.8, exclude=["head", "net.*"], frozen="gate", fold_on_fit_end=False,
                                 schedule=Schedule(end=3))
    make_trainer(max_epochs=4, callbacks=[pruner]).fit(module)
    assert [e.gate.is_binary for e in masked_tensors(module)] == [False, False]
    assert all(torch.equal(e.weight, w) for e, w in zip(masked_tensors(module), before))  # the parameters untouched
    fold(module)
    weights = [module.backbone[i].weight for i in (0, 2)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    assert not torch.equal(weights[1][weights[1] != 0], before[1][weights[1] != 0])  # scaled by the learned gates
    assert any("frozen tensors under soft gates, their kept weights scaled by the learned gate when folded "
               "(frozen='gate'): backbone.*.weight (x2)" in line for line in said)


def test_the_preset_refuses_a_state_that_is_not_a_mask_state_with_the_callbacks_message():
    with pytest.raises(ValueError, match=r"state must be a lightning_masks\.MaskState"):
        MaskPruningCallback.finetuning(0.9, state={"rescale_gate": False})


def test_finetuning_preset_learns_gates_over_a_frozen_backbone():
    pl.seed_everything(0, verbose=False)
    module = FrozenBackbone()
    before = module.backbone[2].weight.detach().clone()
    pruner = MaskPruningCallback.finetuning(0.8, exclude=["head", "net.*"], schedule=Schedule(end=3))
    assert pruner.frozen == "gate" and pruner.sparsity == 0.8
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(module)
    weight = module.backbone[2].weight
    assert int((weight == 0).sum()) > 0.7 * weight.numel() and not torch.equal(weight[weight != 0], before[weight != 0])
    assert MaskPruningCallback.finetuning(frozen="mask").frozen == "mask"


def test_finetuning_preset_starts_gates_low_so_kept_weights_have_room_to_grow():
    """The rescaled gate starts at 1 (the pretrained function) but may reach ``1 / g0``: about 21 from
    ``g0 = sigmoid(|w| - 3)``, not 2 from gates at one half."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    weight = layer.weight.detach().clone()
    preset = MaskPruningCallback.finetuning(0.9)
    [entry] = attach(layer, init=preset.initializer, rescale=preset.state.rescale_gate, compact=preset.state.compact)
    torch.testing.assert_close(layer.weight, weight, rtol=0.1, atol=0)  # as it was (one rescale per tensor)
    ceiling = float(entry.gate.gate_scale)
    assert 19 < ceiling < 1 / torch.sigmoid(torch.tensor(-3.0)).item() + 1e-3
    with torch.no_grad():
        entry.gate.scores.fill_(30.0)  # every gate at its top
    torch.testing.assert_close(layer.weight, weight * ceiling)

    assert isinstance(MaskPruningCallback.finetuning(init="wanda").initializer, Wanda)
    assert MaskPruningCallback.finetuning(init="wanda").initializer.shift == MaskPruningCallback.FINETUNING_SHIFT
    unrescaled = MaskPruningCallback.finetuning(state=MaskState(rescale_gate=False))
    assert unrescaled.initializer.shift == 0  # the gates would shrink the network: not shifted
    given = get_initializer("magnitude", shift=0.5)
    assert MaskPruningCallback.finetuning(init=given).initializer is given



@pytest.mark.parametrize("init", [get_initializer("magnitude_noise", noise_scale=0.01), lambda weight: weight.abs()])
def test_the_preset_warns_when_an_initializer_you_built_is_left_unshifted(init):
    """The preset's shift is what it adds; an initializer object (or callable) is used as it is, so one left at
    shift 0 is named, with the fix."""
    with pytest.warns(UserWarning, match=r"finetuning\(\) uses init=.* as it is, unshifted: .* pass a name "
                                         r"\(init='magnitude'\) or build it with shift=MaskPruningCallback"):
        preset = MaskPruningCallback.finetuning(0.9, init=init)
    assert preset.initializer.shift == 0


def test_the_preset_is_quiet_on_a_name_or_a_shifted_initializer(recwarn):
    MaskPruningCallback.finetuning(0.9, init="magnitude_noise")
    MaskPruningCallback.finetuning(0.9, init=get_initializer("magnitude_noise", shift=-2.0))
    MaskPruningCallback.finetuning(0.9, init=get_initializer("magnitude_noise"), state=MaskState(rescale_gate=False))
    assert not [w for w in recwarn if "unshifted" in str(w.message)]

def test_frozen_must_be_skip_mask_or_gate():
    with pytest.raises(ValueError, match=r"frozen must be one of \['skip', 'mask', 'gate'\], got 'learn'"):
        MaskPruningCallback(frozen="learn")


# ------------------------------------------------------------------------------------------ early ends
def test_early_stopping_warns_and_folds_what_was_reached(tiny_module):
    stopper = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)
    pruner = MaskPruningCallback(0.9, schedule=Schedule(end=8,
        update_every=1))  # updates before the stop at the end of epoch 1
    with pytest.warns(UserWarning, match=r"fit ended at step \d+, before the ramp's end at step 32: target sparsity "
                                         r"0.9 \(reached (\d+\.\d+)%\); the model is folded as it is; pass "
                                         r"early_end='final'"):
        make_trainer(max_epochs=12, callbacks=[stopper, pruner]).fit(tiny_module)
    reached, total = zeros_and_total(tiny_module)
    assert plain(tiny_module) and reached == pruner.plan.pruned and 0 < reached < round(0.9 * total)
    assert reached == round(pruner.plan.target * total)


def test_early_end_final_jumps_to_the_final_target(tiny_module, recwarn):
    stopper = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)
    pruner = MaskPruningCallback(0.9, schedule=Schedule(end=8, early_end="final"))
    make_trainer(max_epochs=12, callbacks=[stopper, pruner]).fit(tiny_module)
    reached, total = zeros_and_total(tiny_module)
    assert reached == round(0.9 * total)
    assert not [w for w in recwarn if "ramp" in str(w.message)]


class Slow(Callback):
    def on_train_batch_end(self, *args):
        time.sleep(0.3)


def test_max_time_ends_early_with_a_warning(tiny_module):
    pruner = MaskPruningCallback(0.9, schedule=Schedule(end=8))
    with pytest.warns(UserWarning, match=r"before the ramp's end .* target sparsity 0.9"):
        make_trainer(max_epochs=12, max_time={"seconds": 2}, callbacks=[pruner, Slow()]).fit(tiny_module)
    reached, total = zeros_and_total(tiny_module)
    assert plain(tiny_module) and reached == pruner.plan.pruned < round(0.9 * total)


def test_an_exception_mid_ramp_warns_and_folds_what_was_reached(tiny_module):
    class Boom(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 6:
                raise RuntimeError("boom")

    pruner = MaskPruningCallback(0.9, schedule=Schedule(end=8,
                                                        update_every=1))  # an update every step: the last one at 6
    with pytest.warns(UserWarning, match=r"fit ended at step 6, .* target sparsity 0.9"), \
            pytest.raises(RuntimeError, match="boom"):
        make_trainer(max_epochs=12, callbacks=[pruner, Boom()]).fit(tiny_module)
    reached, total = zeros_and_total(tiny_module)
    assert plain(tiny_module) and reached == pruner.plan.pruned > 0


def test_a_full_fit_does_not_warn(tiny_module, recwarn):
    make_trainer(max_epochs=3, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=2))]).fit(tiny_module)
    assert not [w for w in recwarn if "ramp" in str(w.message)]


# ------------------------------------------------------------------------------------------ two fits
def test_one_callback_two_fits_gives_each_fit_its_own_lifecycle():
    pruner = MaskPruningCallback(0.6, schedule=Schedule("linear", end=2, update_every="epoch"))
    for seed in (0, 1):
        pl.seed_everything(seed, verbose=False)
        module = TinyModule()
        make_trainer(max_epochs=3, callbacks=[pruner]).fit(module)
        assert pruner.plan.history["positions"] == [0, 1, 2]
        reached, total = zeros_and_total(module)
        assert reached == round(0.6 * total)


def test_constant_schedule_prunes_the_second_model_too():
    pruner = MaskPruningCallback(0.6, schedule="constant")
    for seed in (0, 1):
        pl.seed_everything(seed, verbose=False)
        module = TinyModule()
        make_trainer(max_epochs=2, callbacks=[pruner]).fit(module)
        reached, total = zeros_and_total(module)
        assert reached == round(0.6 * total), seed


# ------------------------------------------------------------------------------------------ export mid-training
def _onnx_outputs(path, x):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return torch.from_numpy(evaluator.run(None, {evaluator.input_names[0]: x.numpy()})[0])


def _to_onnx(module, x, path, dynamo):
    module.to_onnx(path, x, dynamo=dynamo)
    return _onnx_outputs(path, x)


EXPORTERS = {
    "onnx": lambda module, x, path: _to_onnx(module, x, path, dynamo=False),
    "onnx_dynamo": lambda module, x, path: _to_onnx(module, x, path, dynamo=True),
    "jit_trace": lambda module, x, path: torch.jit.trace(module, (x,))(x),
    "torch_export": lambda module, x, path: torch.export.export(module, (x,)).module()(x),
}


class Exporter(Callback):
    """Exports the model as a training epoch ends and as a validation epoch ends (inside the evaluation loop)."""

    def __init__(self, how, tmp_path):
        self.how, self.tmp_path, self.results = how, tmp_path, []

    def _export(self, pl_module, where):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(len(self.results)))
        training = pl_module.training
        with torch.no_grad():
            expected = pl_module(x)
        got = EXPORTERS[self.how](pl_module, x, self.tmp_path / f"{where}{len(self.results)}.onnx")
        self.results.append((where, torch.allclose(got.detach(), expected, atol=1e-5), training == pl_module.training))
        pl_module.train(training)

    def on_train_epoch_end(self, trainer, pl_module):
        self._export(pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        self._export(pl_module, "validation")


@pytest.mark.parametrize("how", list(EXPORTERS))
def test_exporting_mid_training_gives_the_masked_function_and_leaves_training_alone(tmp_path, how):
    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        module = TinyModule()
        pruner = MaskPruningCallback(0.5, schedule=Schedule(end=2))
        make_trainer(max_epochs=3, callbacks=[pruner, *callbacks], deterministic=True,
                     limit_val_batches=2).fit(module)
        return module

    exporter = Exporter(how, tmp_path)
    exported, plain_fit = fit([exporter]), fit([])
    assert {where for where, *_ in exporter.results} == {"train", "validation"}
    assert all(same and kept_mode for _, same, kept_mode in exporter.results), exporter.results
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), plain_fit.state_dict().values()))


def test_torch_save_of_the_whole_module_during_fit(tmp_path):
    x = torch.randn(4, 8)
    saved = []

    class Saver(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            path = tmp_path / f"epoch{trainer.current_epoch}.pt"
            torch.save(pl_module, path)
            saved.append((path, pl_module(x).detach()))

    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=1)), Saver()]).fit(module)
    for path, expected in saved:
        loaded = torch.load(path, weights_only=False)
        assert type(loaded) is TinyModule and len(masked_tensors(loaded)) == 2
        assert torch.allclose(loaded(x), expected)
        fold(loaded)
        assert plain(loaded) and torch.allclose(loaded(x), expected, atol=1e-6)


def test_a_teacher_of_the_same_class_held_by_a_callback_is_left_alone(tiny_module):
    class Distill(Callback):
        def __init__(self):
            pl.seed_everything(1, verbose=False)
            self.teacher = TinyModule()  # other weights: not a copy of the student

    distill = Distill()
    before = {k: v.clone() for k, v in distill.teacher.state_dict().items()}
    make_trainer(max_epochs=2, callbacks=[distill, MaskPruningCallback(0.5, schedule=Schedule(end=1))]).fit(tiny_module)
    assert plain(distill.teacher) and all(torch.equal(before[k], v) for k, v in distill.teacher.state_dict().items())


def test_stochastic_weight_averaging_first_resumes_from_a_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_epochs, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = TinyModule()
        swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        make_trainer(max_epochs=max_epochs, enable_checkpointing=True, deterministic=True,
                     callbacks=[swa, MaskPruningCallback(0.5, schedule=Schedule(end=2)), saver]).fit(module,
                         ckpt_path=ckpt_path)
        return module

    whole = fit(4)
    resumed = fit(4, ckpt_path=tmp_path / "epoch=1.ckpt")  # SWA's average model state is masked: it loads
    zeros_whole, total = zeros_and_total(whole)
    assert zeros_whole == zeros_and_total(resumed)[0] == round(0.5 * total)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole.state_dict().values(),
                                                                resumed.state_dict().values()))


class WithInnerAverage(TinyModule):
    """A module that keeps its own EMA of the network as a submodule (a pattern users write)."""

    def __init__(self) -> None:
        super().__init__()
        self.ema = torch.optim.swa_utils.AveragedModel(self.net)


def test_a_weight_average_kept_inside_the_module_is_named_in_a_warning_and_excluding_it_keeps_the_target():
    pl.seed_everything(0, verbose=False)
    with pytest.warns(UserWarning, match=r"inside a weight average the module keeps \(ema\).*exclude=\['ema\.\*'\]"):
        pruner = MaskPruningCallback(0.5, schedule=Schedule(end=0))
        make_trainer(max_epochs=1, callbacks=[pruner]).fit(WithInnerAverage())
    module = WithInnerAverage()
    make_trainer(max_epochs=1, callbacks=[MaskPruningCallback(0.5, exclude=["ema.*"],
                                                              schedule=Schedule(end=0))]).fit(module)
    zeros, total = zeros_and_total(module.net)
    assert zeros == round(0.5 * total) and not any(p.eq(0).any() for p in module.ema.parameters() if p.dim() > 1)
