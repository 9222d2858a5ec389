"""MaskPruningCallback in real Trainer runs: schedule, optimizers, cadence, folding and bad input."""

import inspect

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, synthetic_loader, zeros_and_total
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn
from torch.nn.utils import parametrize

from lightning_masks import (
    MaskLogging,
    MaskOptimizer,
    MaskPruningCallback,
    MaskState,
    Schedule,
    Selector,
    ThresholdSchedule,
    fold_checkpoint,
    masked_tensors,
)
from lightning_masks.lightning.trainer import check_strategy
from lightning_masks.masking import gate as gate_module
from lightning_masks.zoo.data import DigitsDataModule
from lightning_masks.zoo.models import MLP


class Probe(Callback):
    """Records the pruning callback's state as each epoch or batch starts (it runs after the callback)."""

    def __init__(self, pruner):
        self.pruner = pruner
        self.epochs, self.steps = [], []

    def _record(self, pl_module):
        masked = masked_tensors(pl_module)
        pruned = sum(int((~e.gate.keep).sum()) for e in masked)
        return self.pruner.plan.position, self.pruner.plan.target, pruned, sum(e.numel for e in masked)

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(self._record(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.global_step, *self._record(pl_module)))


@pytest.mark.slow
def test_digits_mlp_reaches_the_exact_sparsity_within_a_few_points_of_dense():
    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model, data = MLP(hidden=(256, 128), lr=3e-3), DigitsDataModule()
        trainer = make_trainer(max_epochs=20, callbacks=callbacks)
        trainer.fit(model, data)
        return model, trainer.test(model, data, verbose=False)[0]["test/acc"]

    dense, dense_acc = run([])
    pruned, pruned_acc = run([MaskPruningCallback()])
    zeros, total = zeros_and_total(pruned)
    assert zeros == round(0.9 * total)
    assert not any(parametrize.is_parametrized(m) for m in pruned.modules())
    assert pruned_acc >= dense_acc - 0.03, (pruned_acc, dense_acc)
    assert zeros_and_total(dense)[0] == 0


def test_the_default_cadence_of_a_short_fit_is_spaced_by_its_length(tiny_module):
    pruner = MaskPruningCallback()
    make_trainer(max_epochs=6, callbacks=[pruner]).fit(tiny_module)
    assert pruner.plan.every == 8  # 24 steps, a ramp of 16: half the ramp (plan.auto_interval)
    assert pruner.plan.history["positions"] == [0, 8, 16]
    zeros, total = zeros_and_total(tiny_module)
    assert zeros == round(0.9 * total)


class AttentionClassifier(TinyModule):
    """A one-block Transformer encoder over 4 tokens of 8 features (exercises nn.MultiheadAttention)."""

    def __init__(self):
        super().__init__(features=32)
        self.net = nn.Sequential(
            nn.Unflatten(1, (4, 8)),
            nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1),
            nn.Flatten(),
            nn.Linear(32, 3),
        )


def test_transformer_with_multihead_attention_is_masked_and_folded():
    pl.seed_everything(0, verbose=False)
    module = AttentionClassifier()
    pruner = MaskPruningCallback(0.8, schedule=Schedule(end=2))
    make_trainer(max_epochs=3, callbacks=[pruner]).fit(module)
    attention = module.net[1].layers[0].self_attn
    assert not parametrize.is_parametrized(attention)
    weights = [attention.in_proj_weight, attention.out_proj.weight, module.net[3].weight,
               module.net[1].layers[0].linear1.weight, module.net[1].layers[0].linear2.weight]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * total)
    assert (attention.in_proj_weight == 0).any()


class ConvBatchNorm(TinyModule):
    def __init__(self):
        super().__init__(features=16)
        self.net = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_conv_with_batchnorm_and_frozen_layer():
    pl.seed_everything(0, verbose=False)
    module = ConvBatchNorm()
    module.net[5].weight.requires_grad_(False)
    frozen = module.net[5].weight.detach().clone()
    make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=1))]).fit(module)
    assert torch.equal(module.net[5].weight, frozen)
    conv = module.net[1].weight
    assert int((conv == 0).sum()) == round(0.5 * conv.numel())
    assert not (module.net[2].weight == 0).any()


def test_fit_twice_does_not_mask_twice(tiny_module):
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False, schedule=Schedule(end=1))
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(tiny_module)
    first = masked_tensors(tiny_module)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(tiny_module)
    assert [e.gate for e in masked_tensors(tiny_module)] == [e.gate for e in first]
    assert all(len(m.parametrizations.weight) == 1 for m in tiny_module.net if hasattr(m, "parametrizations"))


def test_fold_on_fit_end_false_keeps_the_masks(tiny_module):
    make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(0.5, fold_on_fit_end=False,
                                                              schedule=Schedule(end=1))]).fit(tiny_module)
    assert len(masked_tensors(tiny_module)) == 2


def test_threshold_schedule_and_callable_schedule(tiny_module):
    pruner = MaskPruningCallback(schedule=ThresholdSchedule("linear", final=0.6, end=1), fold_on_fit_end=False)
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(tiny_module)
    for entry in masked_tensors(tiny_module):
        gates = torch.sigmoid(entry.gate.scores.detach())
        assert not torch.any(entry.gate.keep & (gates < 0.6))
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    pruner = MaskPruningCallback(schedule=lambda epoch: [0.0, 0.3, 0.7][epoch], fold_on_fit_end=False)
    probe = Probe(pruner)
    make_trainer(max_epochs=3, callbacks=[pruner, probe]).fit(module)
    assert [target for _, target, _, _ in probe.epochs] == [0.0, 0.3, 0.7]


def test_snip_scores_come_from_one_batch_of_the_dense_network():
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    dense = TinyModule()
    dense.load_state_dict(module.state_dict())
    x, y = next(iter(synthetic_loader()))
    loss = nn.functional.cross_entropy(dense(x), y)
    grads = torch.autograd.grad(loss, [dense.net[0].weight, dense.net[2].weight])
    expected = [(w * g).abs() for w, g in zip([dense.net[0].weight, dense.net[2].weight], grads)]
    seen = []

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.extend(e.gate.scores.detach().clone() for e in masked_tensors(pl_module))

    make_trainer(max_steps=1, callbacks=[MaskPruningCallback(init="snip"), Snapshot()]).fit(module)
    # the scores are bfloat16
    assert all(torch.allclose(a.float(), b.to(a.dtype).float(), atol=1e-7) for a, b in zip(seen, expected))


def test_seed_gives_the_same_scores():
    def scores(seed):
        pl.seed_everything(0, verbose=False)
        module = TinyModule()
        pruner = MaskPruningCallback(init="magnitude_noise", seed=seed)
        pruner.setup(make_trainer(max_epochs=1), module, "fit")
        module.configure_model()  # as Lightning does next: the masks are attached once the module is built
        return torch.cat([e.gate.scores.detach().flatten() for e in masked_tensors(module)])

    assert torch.equal(scores(7), scores(7)) and not torch.equal(scores(7), scores(8))


def test_state_dict_round_trip():
    pruner = MaskPruningCallback()
    pruner.plan.position, pruner.plan.target, pruner.plan.pruned = 3, 0.5, 12
    other = MaskPruningCallback()
    other.load_state_dict(pruner.state_dict())
    assert (other.plan.position, other.plan.target, other.plan.pruned, other.scores_initialized) == (3, 0.5, 12, False)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\), got -0.1"),
    ({"sparsity": 1.5}, r"sparsity must be in \[0, 1\), got 1.5"),
    ({"init": "magnitde"}, r"unknown initializer 'magnitde'; known initializers: \['constant', 'from_zeros', "
                           r"'kaiming'"),
    ({"init": "magnitude_noise", "seed": 0.5}, r"seed must be an int or None, got 0.5"),
    ({"state": {"temperature": 0}}, r"temperature must be > 0, got 0"),
    ({"state": {"temperature": -2.0}}, r"temperature must be > 0, got -2.0"),
    ({"granularity": "4:2"}, r"invalid granularity '4:2'; use 'element', 'channel' or an N:M spec"),
    ({"granularity": "2:4", "sparsity": 0.9}, r"granularity '2:4' fixes sparsity at 0.5, got sparsity=0.9"),
    ({"schedule": "quadratic"}, r"unknown schedule 'quadratic'"),
    ({"schedule": {"update_every": 0}}, r"update_every must be 'auto', 'epoch' or a positive int"),
    ({"optimizer": {"lr": -1.0}}, r"lr must be >= 0 or None, got -1.0"),
    ({"importance": "taylor"}, r"unknown importance 'taylor'"),
    ({"tie": ["net.0.weight", "net.2.weight"]}, r"tie must be 'auto' or a list of groups, each a non-empty list"),
    ({"tie": [["net.*"]], "granularity": "2:4"}, r"tie cannot be combined with N:M granularity"),
    ({"tie": "automatic"}, r"tie must be 'auto' or a list of groups, each .* got 'automatic'"),
    ({"schedule": {"start": 0.8, "end": 0.2}}, r"the ramp is inverted: start=0.8 > end=0.2; .* give start <= end"),
    ({"schedule": {"start": 5, "end": 2}}, r"the ramp is inverted: start=5 > end=2"),
    ({"optimizer": {"lr": "0.01"}}, r"lr must be >= 0 or None, got '0.01', a str: pass a number; e.g. "
                                    r"MaskOptimizer\(lr=0.01\)"),
    ({"optimizer": {"weight_decay": "0"}}, r"weight_decay must be >= 0 or None, got '0', a str"),
    ({"layer_floor": "0.25"}, r"layer_floor must be in \[0, 1\], got '0.25'"),
    ({"layer_floor": 1.5}, r"layer_floor must be in \[0, 1\], got 1.5"),
    ({"sparsity": "0.9"}, r"sparsity must be in \[0, 1\), got '0.9', a str"),
    ({"state": {"temperature": True}}, r"temperature must be > 0, got True, a bool"),
    ({"schedule": {"update_every": True}},
     r"update_every must be 'auto', 'epoch' or a positive int \(steps\), got True"),
    ({"targets": 3}, r"targets must be a glob on qualified names, a module type, or a list of them or None, got 3"),
    ({"exclude": [1]}, r"exclude must be a glob .* got \[1\]"),
    ({"mode": 1}, r"mode must be 'global', 'layer' or 'row', got 1"),
    ({"schedule": {"early_end": "jump"}}, r"early_end must be one of \['warn', 'final'\], got 'jump'"),
    ({"seed": 1.5}, r"seed must be an int or None, got 1.5"),
    ({"fold_on_fit_end": "no"}, r"fold_on_fit_end must be True or False, got 'no'"),
    ({"logging": {"every_n_steps": -1}}, r"every_n_steps must be an int >= 0 or None, got -1"),
    ({"state": {"score_dtype": "float16"}}, r"score_dtype must be one of \['bfloat16', 'float32', 'float64'\]"),
    ({"optimizer": {"fused_adam": 1}}, r"fused_adam must be True or False, got 1"),
    ({"logging": {"plots": "no"}}, r"plots must be True or False, got 'no'"),
    ({"state": MaskOptimizer()},
     r"state must be a lightning_masks.MaskState \(e.g. state=MaskState\(temperature=0.5\)\), got MaskOptimizer"),
    ({"optimizer": {"lr": float("inf")}}, r"lr must be >= 0 or None, got inf, not a finite number"),
    ({"state": {"temperature": float("inf")}}, r"temperature must be > 0, got inf, not a finite number"),
    ({"output_layers": 5}, r"output_layers must be 'auto', None or a list of globs on module names, got 5"),
    ({"output_layers": ["head", 3]}, r"output_layers must be .* got \['head', 3\]; e.g. output_layers=\['head'\]"),
    ({"schedule": Selector(mode="layer")}, r"schedule got a Selector, .* pass selector=Selector\(mode='layer'"),
    ({"init": MaskLogging()}, r"init got a MaskLogging, .* pass logging=MaskLogging\("),
])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskPruningCallback(**as_objects(kwargs))



@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mask_lr": 0.01}, r"got mask_lr=0.01, a field of MaskOptimizer: pass optimizer=MaskOptimizer\(lr=0.01\)"),
    ({"end": 0.5}, r"got end=0.5, a field of Schedule: pass schedule=Schedule\(end=0.5\)"),
    ({"temperature": 0.5}, r"pass state=MaskState\(temperature=0.5\)"),
    ({"granularity": "2:4"}, r"pass selector=Selector\(granularity='2:4'\)"),
    ({"log_every_n_steps": 5}, r"pass logging=MaskLogging\(every_n_steps=5\)"),
    ({"lr": 0.1}, r"pass optimizer=MaskOptimizer\(lr=0.1\)"),
    ({"sparsty": 0.9}, r"unexpected keyword argument sparsty=0.9; its arguments are \['sparsity', 'init'"),
])
@pytest.mark.parametrize("build", [MaskPruningCallback, MaskPruningCallback.finetuning])
def test_a_strategy_field_passed_flat_is_refused_naming_its_object(build, kwargs, message):
    with pytest.raises(TypeError, match=message):
        build(0.9, **kwargs)

#: the callback's strategy arguments, built from the fields a table row gives them
STRATEGIES = {"selector": Selector, "schedule": Schedule, "state": MaskState, "optimizer": MaskOptimizer,
              "logging": MaskLogging}


def as_objects(kwargs: dict) -> dict:
    """The callback's arguments with each strategy's fields (``{"state": {"temperature": 0}}``, or the selection's
    ``granularity``, ``tie``, ... given loose) built into its object, inside the ``raises`` block."""
    fields = set(inspect.signature(Selector).parameters)
    selection = {key: value for key, value in kwargs.items() if key in fields}
    rest = {key: STRATEGIES[key](**value) if isinstance(value, dict) else value
            for key, value in kwargs.items() if key not in fields}
    return {**rest, "selector": Selector(**selection)} if selection else rest


def fit_expecting(error_match, module, **trainer_kwargs):
    """Fit, expect a ValueError before any step, and check the module was left as it was."""
    before = {k: v.clone() for k, v in module.state_dict().items()}
    steps = []

    class Steps(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer_kwargs["callbacks"] = [*trainer_kwargs["callbacks"], Steps()]
    with pytest.raises(ValueError, match=error_match):
        make_trainer(**trainer_kwargs).fit(module)
    assert not steps
    assert not any(parametrize.is_parametrized(m) for m in module.modules())
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_target_matching_nothing_is_refused_in_setup(tiny_module):
    fit_expecting(r"'decoder\.\*' matches no module.*candidates include \[.*'net\.0\.weight'", tiny_module,
                  max_epochs=1, callbacks=[MaskPruningCallback(targets=["decoder.*"])])


def test_nan_weight_is_named_in_setup(tiny_module):
    with torch.no_grad():
        tiny_module.net[2].weight[1, 1] = float("inf")
    fit_expecting(r"weight 'net.2.weight' holds NaN or Inf", tiny_module, max_epochs=1,
                  callbacks=[MaskPruningCallback()])


def test_unbounded_training_with_fractional_schedule_is_refused(tiny_module):
    fit_expecting(r"training length is unbounded \(max_epochs=-1, max_steps=-1\); set max_epochs or max_steps",
                  tiny_module, max_epochs=-1, callbacks=[MaskPruningCallback()])


class Streamed(TinyModule):
    """TinyModule's data as a stream: a dataloader with no length."""

    def train_dataloader(self):
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                generator = torch.Generator().manual_seed(0)
                return iter([(torch.randn(8, generator=generator), torch.tensor(i % 3)) for i in range(32)])

        return torch.utils.data.DataLoader(Stream(), batch_size=8)


@pytest.mark.parametrize("schedule", ["cubic", Schedule("cubic", start=0, end=2)])
def test_a_stream_without_max_steps_is_refused_naming_the_fix(schedule):
    """A dataloader with no length and no max_steps: the fit's steps are unknown (they failed as a NaN)."""
    fit_expecting(r"no length \(a stream\) and max_steps is unset.*set max_steps", Streamed(), max_epochs=2,
                  callbacks=[MaskPruningCallback(0.5, schedule=schedule)])
    make_trainer(max_steps=3, callbacks=[MaskPruningCallback(0.5)]).fit(Streamed())  # with max_steps: fine


def test_nm_rows_not_divisible_are_refused_in_setup(tiny_module):
    fit_expecting(r"2:5 needs rows divisible by 5, but 'net.0.weight'", tiny_module, max_epochs=1,
                  callbacks=[MaskPruningCallback(selector=Selector(granularity="2:5"))])


@pytest.mark.parametrize("tie, message", [
    ([["net.0.weight", "net.9.weight"]], r"tie pattern 'net.9.weight' matches no masked tensor; masked tensors: "
                                         r"\['net.0.weight', 'net.2.weight'\]"),
    ([["net.0.weight", "net.2.weight"]], r"the same number of units, got 'net.0.weight': 16, 'net.2.weight': 3"),
])
def test_bad_tie_groups_are_refused_in_setup(tiny_module, tie, message):
    fit_expecting(message, tiny_module, max_epochs=1,  # output_layers=None: the classifier is masked too
                  callbacks=[MaskPruningCallback(selector=Selector(granularity="channel", tie=tie),
                                                 output_layers=None)])


def test_automatic_ties_need_an_example_input_array(tiny_module):
    fit_expecting(r"tie='auto' traces the model on pl_module.example_input_array, which is not set", tiny_module,
                  max_epochs=1, callbacks=[MaskPruningCallback(selector=Selector(tie="auto"))])


def test_fsdp1_is_refused_naming_what_works():
    # Lightning refuses FSDPStrategy on CPU itself, so the decision is tested on the real strategy object; FSDP2
    # (ModelParallelStrategy) runs in tests/test_fsdp.py
    works = r"ModelParallelStrategy\(data_parallel_size=<devices>, tensor_parallel_size=1\)"
    with pytest.raises(ValueError, match=r"does not support the FSDPStrategy strategy.*'ddp_spawn'.*" + works):
        check_strategy(FSDPStrategy())
    check_strategy(DDPStrategy())
    check_strategy(SingleDeviceStrategy("cpu"))
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_gates_are_computed_once_per_evaluation_loop(tiny_module, stage, monkeypatch):
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False, schedule=Schedule(end=1))
    make_trainer(max_epochs=1, callbacks=[pruner], limit_val_batches=0).fit(tiny_module)
    calls = []
    computed = gate_module.gated
    monkeypatch.setattr(gate_module, "gated", lambda *args: calls.append(1) or computed(*args))
    getattr(make_trainer(callbacks=[pruner]), stage)(tiny_module)  # 4 batches
    assert len(calls) == 2  # one per masked tensor, not one per batch
    assert parametrize._cache_enabled == 0 and not parametrize._cache
    x = torch.randn(2, 8)
    tiny_module(x)
    assert len(calls) == 4  # outside evaluation, computed on every access again


def test_channel_granularity_zeroes_whole_channels_and_restores_from_a_checkpoint(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = ConvBatchNorm()
    # output_layers=None: the classifier's rows are pruned too (the default keeps them whole)
    pruner = MaskPruningCallback(0.5, selector=Selector(granularity="channel"), fold_on_fit_end=False,
                                 output_layers=None, schedule=Schedule(end=1))
    trainer = make_trainer(max_epochs=2, callbacks=[pruner])
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "channel.ckpt")
    conv, linear = module.net[1], module.net[5]
    assert pruner.plan.pruned == round(0.5 * (4 + 3))
    x = torch.randn(5, 16)
    expected = module.eval()(x)  # eval: BatchNorm uses (and keeps) its running statistics
    plain = ConvBatchNorm()
    evaluator = make_trainer(callbacks=[MaskPruningCallback(selector=Selector(granularity="channel"))])
    evaluator.validate(plain, ckpt_path=tmp_path / "channel.ckpt")
    assert torch.allclose(plain.eval()(x), expected, atol=1e-6)
    zero_rows = [int((layer.weight.reshape(layer.weight.shape[0], -1) == 0).all(1).sum())
                 for layer in (plain.net[1], plain.net[5])]
    assert sum(zero_rows) == pruner.plan.pruned and conv.parametrizations.weight[0].scores.shape == (4, 1, 1, 1)
    assert int((plain.net[1].bias == 0).sum()) + int((plain.net[5].bias == 0).sum()) == pruner.plan.pruned
    folded = fold_checkpoint(tmp_path / "channel.ckpt", tmp_path / "plain.ckpt")
    assert torch.allclose(ConvBatchNorm.load_from_checkpoint(folded).eval()(x), expected, atol=1e-6)
    assert linear.parametrizations.weight[0].scores.shape == (3, 1)


def test_the_selection_is_one_selector_object(tiny_module):
    selector = Selector(mode="layer", granularity="2:4")
    pruner = MaskPruningCallback(selector=selector, schedule=Schedule(end=1))
    assert pruner.selector is selector and pruner.sparsity == 0.5
    make_trainer(max_epochs=1, callbacks=[pruner]).fit(tiny_module)
    for layer in (tiny_module.net[0], tiny_module.net[2]):
        assert layer.weight.reshape(-1, 4).ne(0).sum(1).le(2).all()
    assert MaskPruningCallback().selector == Selector()
    assert Selector(mode="layer", tie=[]) == Selector(mode="layer")
    with pytest.raises(TypeError, match="layer_floor"):
        MaskPruningCallback(**{"layer_floor": 0.5})  # the selection's fields live in the Selector only
    with pytest.raises(ValueError, match="selector must be a lightning_masks.Selector .* got 'layer'"):
        MaskPruningCallback(selector="layer")


def test_straight_through_needs_regrowth_and_lets_pruned_entries_come_back():
    with pytest.raises(ValueError, match="straight_through=True needs regrow=True"):
        Selector(straight_through=True)

    class Watch(Callback):
        """After each backward: do pruned entries' scores have a gradient? Which pruned entries came back?"""

        def __init__(self):
            self.ever_pruned, self.regrown, self.pruned_scores_learn = None, 0, []

        def on_after_backward(self, trainer, pl_module):
            gates = [e.gate for e in masked_tensors(pl_module)]
            if any(not g.keep.all() for g in gates):
                self.pruned_scores_learn.append(any(bool(torch.any(g.scores.grad[~g.keep] != 0)) for g in gates))
            keep = torch.cat([g.keep.flatten() for g in gates])
            self.ever_pruned = ~keep if self.ever_pruned is None else self.ever_pruned | ~keep
            self.regrown = max(self.regrown, int((self.ever_pruned & keep).sum()))

    def fit(straight_through):
        torch.manual_seed(0)
        model, watch = TinyModule(), Watch()
        pruner = MaskPruningCallback(0.7, selector=Selector(regrow=True, straight_through=straight_through),
                                     schedule=Schedule(start=0, end=3, update_every=2),
                                     logging=MaskLogging(plots=False, histograms=False))
        make_trainer(max_epochs=4, callbacks=[pruner, watch]).fit(model, synthetic_loader(n=128))
        assert zeros_and_total(model)[0] == round(0.7 * zeros_and_total(model)[1])
        return watch

    straight, plain = fit(True), fit(False)
    assert straight.pruned_scores_learn and all(straight.pruned_scores_learn)
    assert not any(plain.pruned_scores_learn)  # without it a pruned entry's score gets exactly zero
    assert straight.regrown > 0  # pruned entries came back
