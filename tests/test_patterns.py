"""N:M patterns learned through a Gumbel-softmax (MaskLLM): the relaxation's math, the selector and the callback."""

import itertools

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_masks import (
    GumbelPatterns,
    MaskOptimizer,
    MaskPruningCallback,
    Schedule,
    Selector,
    attach,
    masked_tensors,
)
from lightning_masks.masking import standardized
from lightning_masks.masking.patterns import RelaxedGroups, relaxed_keep

RELAXED = dict(selector=Selector(granularity="2:4", relaxation="gumbel"),
               schedule=Schedule("constant", start=0, update_every=10))


def test_a_relaxed_keep_is_a_mixture_of_whole_patterns_in_every_group():
    torch.manual_seed(0)
    scores = torch.randn(6, 8, requires_grad=True)
    keep = relaxed_keep(scores, 2, 4, axis=0, tau=1.0, scale=1.0)
    assert keep.shape == scores.shape and keep.min() >= 0 and keep.max() <= 1
    torch.testing.assert_close(keep.reshape(-1, 4).sum(1), torch.full((12,), 2.0))
    keep.pow(2).sum().backward()
    assert scores.grad is not None and (scores.grad != 0).all()  # every entry's score learns, kept or not


def test_a_cold_relaxed_keep_is_each_groups_top_n_pattern():
    scores = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    keep = relaxed_keep(scores, 2, 4, axis=0, tau=1e-3, scale=1.0, noise=False)
    top = torch.zeros(15, 4).scatter_(1, scores.reshape(-1, 4).topk(2, dim=1).indices, 1.0).view_as(scores)
    torch.testing.assert_close(keep, top)


def test_groups_run_along_the_axes_other_than_the_output_axis():
    scores = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))  # output axis 1 (a ConvTranspose's)
    along = relaxed_keep(scores, 1, 4, axis=1, tau=0.5, scale=2.0, noise=False)
    torch.testing.assert_close(along, relaxed_keep(scores.T.contiguous(), 1, 4, axis=0, tau=0.5, scale=2.0,
                                                   noise=False).T)


@pytest.mark.parametrize("hard", [False, True])
def test_the_sample_is_the_seeded_gumbel_softmax_over_the_six_patterns(hard):
    """Groups of 2:4, against torch's own Gumbel-softmax over the six patterns' logits, values and gradients."""
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.1, 0.2, -0.3, 0.0]], requires_grad=True)
    patterns = torch.tensor([[1.0 if i in kept else 0.0 for i in range(4)]
                             for kept in itertools.combinations(range(4), 2)])
    weights = torch.arange(1.0, 9.0)
    torch.manual_seed(3)
    ours = relaxed_keep(scores, 2, 4, axis=0, tau=0.7, scale=3.0, hard=hard)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), scores)
    torch.manual_seed(3)
    logits = 3.0 * scores.reshape(2, 4) @ patterns.T
    theirs = (nn.functional.gumbel_softmax(logits, tau=0.7, hard=hard) @ patterns).reshape(1, 8)
    (theirs_grad,) = torch.autograd.grad((theirs * weights).sum(), scores)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)
    if hard:  # whole patterns: two of each four exactly kept
        assert set(ours.flatten().tolist()) <= {0.0, 1.0} and ours.reshape(2, 4).sum(1).tolist() == [2.0, 2.0]


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=(4.0,)), "temperature must be"),
    (dict(temperature="hot"), "temperature must be"),
    (dict(temperature=(4.0, 0.0)), r"temperature\[1\] must be > 0"),
    (dict(scale=-1.0), "scale must be > 0"),
    (dict(scale=float("inf")), "scale must be > 0"),
    (dict(hard=1), "hard must be True or False"),
])
def test_gumbel_patterns_refuse_bad_settings_naming_them(settings, message):
    with pytest.raises(ValueError, match=message):
        GumbelPatterns(**settings)


def test_the_temperature_anneals_linearly_from_start_to_end():
    patterns = GumbelPatterns(temperature=[4, 0.1])  # a list, as Hydra passes it
    assert patterns.temperature == (4.0, 0.1)
    assert [patterns.tau(p) for p in (-1.0, 0.0, 0.5, 1.0, 2.0)] == pytest.approx([4.0, 4.0, 2.05, 0.1, 0.1])


def test_standardized_scores_have_zero_mean_and_unit_spread():
    values = standardized(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert values.mean().item() == pytest.approx(0.0, abs=1e-6) and values.std().item() == pytest.approx(1.0)
    assert torch.equal(standardized(torch.full((4,), 0.3)), torch.zeros(4))


@pytest.mark.parametrize("spec, expected", [("gumbel", GumbelPatterns()),
                                            ({"scale": 3.0}, GumbelPatterns(scale=3.0))])
def test_the_selector_takes_a_relaxation_by_name_or_fields(spec, expected):
    assert Selector(granularity="2:4", relaxation=spec).relaxation == expected


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_a_relaxation_without_n_m_is_refused_naming_the_fix(granularity):
    with pytest.raises(ValueError, match=r"pass an N:M granularity, e\.g\. Selector\(granularity='2:4'"):
        Selector(granularity=granularity, relaxation="gumbel")


def test_an_unknown_relaxation_is_refused():
    with pytest.raises(ValueError, match="relaxation must be None, 'gumbel' or a lightning_masks.GumbelPatterns"):
        Selector(granularity="2:4", relaxation="softmax")


def test_the_selection_keeps_each_groups_most_probable_pattern_even_where_it_was_pruned():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    (entry,) = attach(layer)
    entry.gate.set_keep(torch.zeros(3, 8, dtype=torch.bool))  # nothing kept: a plain N:M selection would keep nothing
    with torch.no_grad():
        entry.gate.scores.copy_(torch.randn(3, 8))
    Selector(granularity="2:4", relaxation="gumbel")([entry], 0.5)
    top = torch.zeros(6, 4, dtype=torch.bool).scatter_(1, entry.gate.scores.reshape(-1, 4).topk(2, dim=1).indices, True)
    assert torch.equal(entry.gate.keep, top.view(3, 8))


def test_a_relaxation_on_a_ramping_schedule_is_refused_before_any_step():
    with pytest.raises(ValueError, match=r"pass schedule=Schedule\('constant', start=0, update_every=10\)"):
        MaskPruningCallback(selector=Selector(granularity="2:4", relaxation="gumbel"))


class FrozenRegression(pl.LightningModule):
    """A frozen Linear whose two large weights of each group of 4 are useless: the target needs the small ones."""

    WEIGHT = torch.tensor([1.0, -0.9, 0.2, 0.15] * 2).repeat(4, 1)
    NEEDED = torch.tensor([0.0, 0.0, 1.0, 1.0] * 2).repeat(4, 1)

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 4)
        with torch.no_grad():
            self.layer.weight.copy_(self.WEIGHT)
            self.layer.bias.zero_()
        self.layer.weight.requires_grad_(False)
        self.inputs = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
        self.targets = self.inputs @ (self.WEIGHT * self.NEEDED).T

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=32)

    def configure_optimizers(self):
        return torch.optim.Adam([self.layer.bias], lr=1e-2)  # the callback's copy of it trains the scores


def test_learned_patterns_leave_the_magnitude_prior_for_the_weights_the_loss_needs():
    """Magnitude's pattern keeps the two large weights of each group; the loss needs the two small ones. Binary masks
    over the frozen weights (the callback's defaults otherwise): after the fit every group keeps exactly the small
    ones, bit for bit, where the same fit without the relaxation's sampling (scores held) keeps magnitude's."""
    results = {}
    for name, optimizer in (("learned", None), ("held", MaskOptimizer(lr=0.0))):
        torch.manual_seed(0)
        module = FrozenRegression()
        callback = MaskPruningCallback(frozen="mask", optimizer=optimizer, **RELAXED)
        make_trainer(max_epochs=10, callbacks=[callback]).fit(module)
        assert not masked_tensors(module)  # folded
        results[name] = module.layer.weight.detach()
    weight, needed = FrozenRegression.WEIGHT, FrozenRegression.NEEDED
    assert torch.equal(results["learned"], weight * needed)
    assert torch.equal(results["held"], weight * (1 - needed))


class TauProbe(pl.Callback):
    """Reads the relaxation's temperature and whether the forward was sampled, step by step."""

    def __init__(self) -> None:
        self.taus: list[float] = []
        self.sampled: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (entry,) = [e for e in masked_tensors(pl_module) if e.name == "net.0.weight"]
        self.taus.append(entry.gate.relaxation.tau)
        weight = entry.weight.detach()
        with torch.enable_grad():
            entry.gate.train()
            sampled = entry.gate(weight)
        entry.gate.eval()
        binary = entry.gate(weight)
        entry.gate.train()
        self.sampled.append(not torch.equal(sampled, binary) and torch.equal(binary, weight * entry.gate.keep))


def test_the_fit_anneals_the_temperature_samples_in_training_and_ends_in_exact_n_m():
    torch.manual_seed(0)
    module = TinyModule()
    probe = TauProbe()
    make_trainer(max_epochs=4, callbacks=[MaskPruningCallback(**RELAXED), probe]).fit(module)
    assert probe.taus[0] == pytest.approx(4.0) and probe.taus[-1] == pytest.approx(0.1 + 3.9 / 16, rel=1e-3)
    assert all(a > b for a, b in zip(probe.taus, probe.taus[1:]))
    assert all(probe.sampled)
    for layer in (module.net[0], module.net[2]):
        nonzero = (layer.weight != 0).reshape(-1, 4).sum(1)
        assert torch.equal(nonzero, torch.full_like(nonzero, 2)), nonzero


def test_relaxed_gates_are_binary_and_named_in_their_repr():
    torch.manual_seed(0)
    module = TinyModule()
    callback = MaskPruningCallback(fold_on_fit_end=False, **RELAXED)
    make_trainer(max_steps=2, callbacks=[callback]).fit(module)
    for entry in masked_tensors(module):
        assert entry.gate.is_binary and isinstance(entry.gate.relaxation, RelaxedGroups)
        assert "2:4" in repr(entry.gate.relaxation)


def test_a_relaxation_over_a_held_mask_is_refused_before_any_step():
    """A fixed initializer holds its mask all fit; the relaxation would sample other patterns in training and
    reselect as the fit ends: refused at construction, naming the prior to use instead."""
    from lightning_masks import get_initializer
    with pytest.raises(ValueError, match=r"holds its mask for the whole fit.*pass init='from_zeros' \(fixed=False\)"):
        MaskPruningCallback(init=get_initializer("from_zeros", fixed=True), **RELAXED)
    MaskPruningCallback(init="from_zeros", **RELAXED)  # the one-shot mask as the relaxation's prior


@pytest.mark.parametrize("init", ["constant", "stddev"])
def test_an_init_that_gives_equal_scores_under_a_relaxation_is_named_in_a_warning(init):
    torch.manual_seed(0)
    module = TinyModule()
    with pytest.warns(UserWarning, match=r"init=.*gives 2 masked tensors equal scores \(net.0.weight, net.2.weight\)"):
        make_trainer(max_steps=1, callbacks=[MaskPruningCallback(init=init, **RELAXED)]).fit(module)


def test_a_ranking_init_under_a_relaxation_warns_of_no_equal_scores(recwarn):
    torch.manual_seed(0)
    make_trainer(max_steps=1, callbacks=[MaskPruningCallback(**RELAXED)]).fit(TinyModule())
    assert not [w for w in recwarn if "equal scores" in str(w.message)]


def test_frozen_gate_under_a_relaxation_warns_that_the_masks_are_binary():
    with pytest.warns(UserWarning, match="frozen='gate' learns soft gates.*the masks are binary"):
        MaskPruningCallback(frozen="gate", **RELAXED)


def test_a_relaxation_in_a_fit_without_a_bound_on_its_steps_is_refused_before_any_step():
    """The temperature anneals over the fit's steps: unbounded, it stayed at its start for good."""
    torch.manual_seed(0)
    callback = MaskPruningCallback(selector=RELAXED["selector"], schedule=Schedule("constant", start=0, end=1))
    trainer = make_trainer(max_epochs=-1, max_steps=-1, max_time="00:00:00:03", callbacks=[callback])
    with pytest.raises(ValueError, match=r"anneals its temperature over the fit's steps.*set max_steps \(or max_ep"):
        trainer.fit(TinyModule())
    assert trainer.global_step == 0


def test_a_resumed_relaxed_fit_draws_the_noise_the_uninterrupted_one_draws(tmp_path):
    """The relaxation's noise comes from the callback's generator, saved in its checkpoints: resumed mid-fit, the
    temperature, the samples and so the scores and masks go on as in the uninterrupted fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = TinyModule()
        callback = MaskPruningCallback(fold_on_fit_end=False, selector=RELAXED["selector"],
                                       schedule=Schedule("constant", start=0, update_every=2))
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        make_trainer(max_epochs=3, callbacks=[callback, saver], enable_checkpointing=True,
                     deterministic=True).fit(module, ckpt_path=ckpt_path)
        return masked_tensors(module)

    whole = fit()
    resumed = fit(tmp_path / "epoch=0.ckpt")
    for a, b in zip(whole, resumed):
        assert a.gate.relaxation.tau == b.gate.relaxation.tau
        assert torch.equal(a.gate.keep, b.gate.keep)
        assert torch.equal(a.gate.scores, b.gate.scores) and torch.equal(a.weight, b.weight)
