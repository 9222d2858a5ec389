"""The scores' optimizer beside the user's: any scheduler, any param grouping, manual optimization, AMP, clipping."""

from __future__ import annotations

import copy
import inspect

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim import lr_scheduler

from lightning_masks import MaskOptimizer, MaskPruningCallback, MaskState, Schedule, Selector, attach, masked_tensors
from lightning_masks.lightning import ScoreOptimizers


def ids(params):
    return {id(p) for p in params}


# ------------------------------------------------------------------------------------------------ without a Trainer
def test_scores_ride_in_the_group_of_their_weight_and_no_group_is_added():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.3, "weight_decay": 0.1},
                                 {"params": [model[1].weight], "lr": 0.2}])
    masked = attach(model)
    scores = ScoreOptimizers([optimizer], masked, lr=0.05)
    first, second = optimizer.param_groups
    assert ids(first["params"]) == ids([model[0].parametrizations.weight.original, masked[0].gate.scores])
    assert ids(second["params"]) == ids([model[1].parametrizations.weight.original, masked[1].gate.scores])
    [twin] = scores.optimizers
    assert type(twin) is torch.optim.SGD and [g["lr"] for g in twin.param_groups] == [0.05, 0.05]
    assert [g["weight_decay"] for g in twin.param_groups] == [0.1, 0.0]  # the weight's group's when not set
    for group, momentum in zip(optimizer.param_groups, (0.9, 0.5)):  # as a scheduler cycling momentum would
        group["momentum"], group["lr"] = momentum, 1.0
    for e in masked:
        e.gate.scores.grad = torch.ones_like(e.gate.scores)
    scores.stash(optimizer)
    optimizer.step()  # the hook steps the twin, which follows every hyperparameter but its own
    assert [(g["momentum"], g["lr"]) for g in twin.param_groups] == [(0.9, 0.05), (0.5, 0.05)]
    scores.remove()
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]


def test_without_own_settings_the_user_optimizer_trains_the_scores():
    model = nn.Linear(3, 3)
    masked = attach(model)
    optimizer = torch.optim.Adam([model.parametrizations.weight.original])
    scores = ScoreOptimizers([optimizer], masked)
    assert scores.optimizers == [] and ids([masked[0].gate.scores]) <= ids(optimizer.param_groups[0]["params"])


def test_a_twin_that_cannot_be_built_is_refused_with_the_way_out():
    class Custom(torch.optim.SGD):
        def __init__(self, params, model):  # needs more than its defaults hold
            super().__init__(params, lr=0.1)
            self.model = model

    model = nn.Linear(3, 3)
    masked = attach(model)
    weight = model.parametrizations.weight.original
    with pytest.raises(ValueError, match=r"copy of your optimizer \(Custom\).*"
                                         r"MaskOptimizer\(lr=None, weight_decay=None\)"):
        ScoreOptimizers([Custom([weight], model)], masked, lr=0.01)
    with pytest.raises(ValueError, match=r"\(LBFGS\).*LBFGS.step needs a closure"):
        ScoreOptimizers([torch.optim.LBFGS([weight])], masked, lr=0.01)
    ScoreOptimizers([torch.optim.LBFGS([weight])], masked)  # no copy needed: LBFGS trains the scores itself


def test_cpu_adam_groups_holding_scores_or_masked_weights_run_the_fused_kernel():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    masked = attach(model)
    chosen = torch.optim.Adam(model.parameters(), foreach=False)
    default = torch.optim.Adam(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for optimizer in (chosen, default, sgd):
        ScoreOptimizers([optimizer], masked)
    assert default.param_groups[0]["fused"] is True  # no choice made: the fused kernel
    assert chosen.param_groups[0]["fused"] is None and chosen.param_groups[0]["foreach"] is False  # user's choice
    assert sgd.param_groups[0].get("fused") is None  # only Adam/AdamW
    kept = torch.optim.Adam(model.parameters())
    ScoreOptimizers([kept], masked, fuse=False)
    assert kept.param_groups[0]["fused"] is None
    # the masked weights' group gets the fused kernel (their pruned entries' gradients are exact zeros too), and so
    # does the twin's; a group of other parameters only is left alone
    others = nn.Linear(2, 2)
    weights = [e.weight for e in masked]
    split = torch.optim.Adam([{"params": weights}, {"params": list(others.parameters())}])
    [twin] = ScoreOptimizers([split], masked, lr=0.01).optimizers
    assert split.param_groups[0]["fused"] is True and split.param_groups[1]["fused"] is None
    assert twin.param_groups[0]["fused"] is True


def test_fused_adam_trains_masks_like_the_loop():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    results = []
    for fuse in (False, True):
        model = copy.deepcopy(base)
        masked = attach(model, rescale=True)
        masked[0].gate.keep.view(-1)[::2] = False
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        ScoreOptimizers([optimizer], masked, fuse=fuse)
        x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
        for _ in range(20):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*results))


def test_the_fused_adam_switch_is_an_explicit_callback_setting(tiny_module):
    seen = {}

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["fused"] = [group.get("fused") for group in trainer.optimizers[0].param_groups]
            seen["twin"] = [group.get("fused") for t in pruner.score_optimizers for group in t.param_groups]

    for fused_adam, expected in ((True, True), (False, None)):
        pruner = MaskPruningCallback(0.5, optimizer=MaskOptimizer(fused_adam=fused_adam))
        make_trainer(max_steps=1, callbacks=[pruner, Spy()]).fit(tiny_module)
        assert seen["fused"] and seen["twin"] and all(flag is expected for flag in seen["fused"] + seen["twin"]), seen
    with pytest.raises(ValueError, match="fused_adam must be True or False, got 'yes'"):
        MaskPruningCallback(optimizer=MaskOptimizer(fused_adam="yes"))


# ------------------------------------------------------------------------------------------------ in a fit
def test_scores_are_trained_by_the_unmodified_configure_optimizers(tiny_module):
    pruner = MaskPruningCallback(fold_on_fit_end=False, optimizer=MaskOptimizer(lr=None))
    trainer = make_trainer(max_steps=3, callbacks=[pruner])
    initial, groups, twins = None, None, None

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal initial
            initial = [e.gate.scores.detach().clone() for e in masked_tensors(pl_module)]

        def on_train_end(self, trainer, pl_module):
            nonlocal groups, twins
            groups = [[id(p) for p in g["params"]] for g in trainer.optimizers[0].param_groups]
            twins = pruner.score_optimizers

    trainer.callbacks.append(Snapshot())
    trainer.fit(tiny_module)
    masked = masked_tensors(tiny_module)
    assert len(groups) == 1  # with mask_lr=None, in the group of their weights
    assert all(id(e.gate.scores) in groups[0] for e in masked) and twins == []
    assert all(not torch.equal(a, e.gate.scores) for a, e in zip(initial, masked))


class ScheduledModule(TinyModule):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def test_mask_lr_and_weight_decay_are_the_scores_own_whatever_the_schedule():
    pl.seed_everything(0, verbose=False)
    module = ScheduledModule()
    pruner = MaskPruningCallback(fold_on_fit_end=False, optimizer=MaskOptimizer(lr=0.1, weight_decay=0.0))
    seen = {}

    class Spy(Callback):
        def on_train_end(self, trainer, pl_module):
            seen["user"], seen["twins"] = trainer.optimizers, pruner.score_optimizers

    trainer = make_trainer(max_epochs=2, callbacks=[pruner, Spy()])
    trainer.fit(module)
    [optimizer], [twin] = seen["user"], seen["twins"]
    [user] = optimizer.param_groups  # the scores ride in it, trained by the twin
    [masks] = twin.param_groups
    scores = {id(e.gate.scores) for e in masked_tensors(module)}
    assert {id(p) for p in masks["params"]} == scores and type(twin) is torch.optim.AdamW
    assert masks["weight_decay"] == 0.0 and user["weight_decay"] == 0.05
    assert masks["lr"] == 0.1 and user["lr"] == pytest.approx(1e-2 * 0.5**2)
    assert not {id(p) for p in user["params"]} & scores  # taken out again as the fit ends


class TwoOptimizers(TinyModule):
    """Manual optimization with one optimizer per sub-network (as in a GAN)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.other = nn.Linear(3, 3)

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.other(self(x)), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.Adam(self.other.parameters(), lr=1e-2)


def test_several_optimizers_each_train_the_scores_of_their_weights():
    pl.seed_everything(0, verbose=False)
    module = TwoOptimizers()
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False, optimizer=MaskOptimizer(lr=0.05))
    twins = []

    class Spy(Callback):
        def on_train_end(self, trainer, pl_module):
            twins.extend(pruner.score_optimizers)

    trainer = make_trainer(max_epochs=3, callbacks=[pruner, Spy()])
    trainer.fit(module)
    net_scores = {id(e.gate.scores) for e in masked_tensors(module.net)}
    other_scores = {id(e.gate.scores) for e in masked_tensors(module.other)}
    first, second = twins
    assert type(first) is torch.optim.SGD and type(second) is torch.optim.Adam
    assert {id(p) for p in first.param_groups[0]["params"]} == net_scores
    assert {id(p) for p in second.param_groups[0]["params"]} == other_scores
    assert sum(int((~e.gate.keep).sum()) for e in masked_tensors(module)) == round(
        0.5 * sum(e.numel for e in masked_tensors(module)))


# ------------------------------------------------------------------------------------------------ schedulers
def _every_scheduler(optimizer: torch.optim.Optimizer, total: int) -> dict:
    """One instance of each scheduler class in ``torch.optim.lr_scheduler``, as its docs show it."""
    linear, cosine = lr_scheduler.LinearLR, lr_scheduler.CosineAnnealingLR
    return {
        "LambdaLR": lambda: lr_scheduler.LambdaLR(optimizer, lambda step: 0.8 ** step),
        "MultiplicativeLR": lambda: lr_scheduler.MultiplicativeLR(optimizer, lambda step: 0.8),
        "StepLR": lambda: lr_scheduler.StepLR(optimizer, 2, gamma=0.5),
        "MultiStepLR": lambda: lr_scheduler.MultiStepLR(optimizer, [1, 3], gamma=0.5),
        "ConstantLR": lambda: lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=2),
        "LinearLR": lambda: linear(optimizer, start_factor=0.1, total_iters=3),
        "ExponentialLR": lambda: lr_scheduler.ExponentialLR(optimizer, 0.8),
        "SequentialLR": lambda: lr_scheduler.SequentialLR(
            optimizer, [linear(optimizer, start_factor=0.1, total_iters=2), cosine(optimizer, T_max=total)], [2]),
        "CosineAnnealingLR": lambda: cosine(optimizer, T_max=total),
        "ChainedScheduler": lambda: lr_scheduler.ChainedScheduler(
            [lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=2),
             lr_scheduler.ExponentialLR(optimizer, 0.8)]),
        "ReduceLROnPlateau": lambda: lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5, threshold=10),
        # (cycled momentum would reach the scores too: their effective lr is then not their lr)
        "CyclicLR": lambda: lr_scheduler.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=2,
                                                  cycle_momentum=False),
        "OneCycleLR": lambda: lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total + 1,
                                                      cycle_momentum=False),
        "CosineAnnealingWarmRestarts": lambda: lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=2),
        "PolynomialLR": lambda: lr_scheduler.PolynomialLR(optimizer, total_iters=4, power=2.0),
    }


SCHEDULERS = sorted(name for name, cls in vars(lr_scheduler).items()
                    if inspect.isclass(cls) and not name.startswith("_")
                    and issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))
                    and cls is not lr_scheduler.LRScheduler)
STEPS = 6  # 3 epochs of 2 batches


def test_the_scheduler_list_covers_torch():
    assert set(SCHEDULERS) == set(_every_scheduler(torch.optim.SGD([torch.zeros(1)]), STEPS))


class Scheduled(TinyModule):
    """SGD with one of torch's schedulers, stepped per batch or per epoch."""

    def __init__(self, scheduler: str, interval: str, momentum: float = 0.0):
        super().__init__()
        self.scheduler, self.interval, self.momentum = scheduler, interval, momentum

    def train_dataloader(self):
        return torch.utils.data.DataLoader(super().train_dataloader().dataset, batch_size=32)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)
        scheduler = _every_scheduler(optimizer, STEPS)[self.scheduler]()
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.interval, "monitor": "train_loss"}}


class StepSpy(Callback):
    """Each step: the user's learning rates, and the scores' effective learning rate ``<-delta, grad> / |grad|^2``
    (placed before the pruning callback, it sees the gradients before the step; its post-hook runs after the
    scores' step)."""

    def __init__(self):
        self.user_lrs, self.score_lrs, self._before = [], [], None

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda *args: self._after(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.user_lrs.append([group["lr"] for group in optimizer.param_groups])
        scores = [e.gate.scores for e in masked_tensors(pl_module)]
        self._before = [(s.detach().clone(), s.grad.clone()) for s in scores if s.grad is not None]

    def _after(self, pl_module):
        if not self._before or not masked_tensors(pl_module):
            return
        scores = [e.gate.scores for e in masked_tensors(pl_module)]
        delta = sum(((b - s.detach()) * g).sum() for s, (b, g) in zip(scores, self._before))
        self.score_lrs.append(float(delta / sum((g * g).sum() for _, g in self._before)))


def _fit_with_spy(module, *callbacks, **trainer_args):
    spy = StepSpy()
    pl.seed_everything(0, verbose=False)
    make_trainer(callbacks=[spy, *callbacks], **trainer_args).fit(module)
    return spy


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_torch_scheduler_works_unmodified_and_the_scores_follow_mask_lr(scheduler, interval):
    """The user's schedule is what it is without the masks; the scores step at exactly mask_lr throughout."""
    pl.seed_everything(0, verbose=False)
    plain = _fit_with_spy(Scheduled(scheduler, interval), max_steps=STEPS)
    pl.seed_everything(0, verbose=False)
    pruner = MaskPruningCallback(0.5, state=MaskState(score_dtype="float32"), optimizer=MaskOptimizer(lr=0.02))
    masked = _fit_with_spy(Scheduled(scheduler, interval), pruner, max_steps=STEPS)
    assert masked.user_lrs == plain.user_lrs and len(masked.user_lrs) == STEPS
    assert len(set(map(tuple, plain.user_lrs))) > 1 or scheduler == "ReduceLROnPlateau"  # the schedule moves
    assert len(masked.score_lrs) == STEPS and masked.score_lrs == pytest.approx([0.02] * STEPS, rel=1e-4)


WARMUPS = ["linear", "cosine", "constant_with_warmup", "polynomial"]  # transformers.get_scheduler's names


@pytest.mark.parametrize("schedule", WARMUPS)
def test_transformers_warmup_schedules_fine_tune_gpt2_with_the_default_callback(schedule):
    """A transformers fine-tuning setup as its docs write it: AdamW, a warmup schedule stepped per batch."""
    transformers = pytest.importorskip("transformers")

    class FineTune(pl.LightningModule):
        def __init__(self):
            super().__init__()
            config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
            self.model = transformers.GPT2LMHeadModel(config)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def train_dataloader(self):
            tokens = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=4)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
            scheduler = transformers.get_scheduler(schedule, optimizer, num_warmup_steps=3, num_training_steps=8)
            return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    lrs = []

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            twin = pruner.score_optimizers
            lrs.append(([g["lr"] for g in optimizer.param_groups], [g["lr"] for t in twin for g in t.param_groups]))

    pl.seed_everything(0, verbose=False)
    pruner = MaskPruningCallback()
    module = FineTune()
    make_trainer(max_steps=8, callbacks=[pruner, Spy()]).fit(module)
    assert [user for user, _ in lrs][:3] == [[0.0], [1e-3 / 3], [2e-3 / 3]]  # the warmup, as without the masks
    assert all(scores and set(scores) == {0.01} for _, scores in lrs)
    assert not any(name.endswith("scores") for name, _ in module.named_parameters())  # folded: a plain model


# ------------------------------------------------------------------------------------------------ param groups
class MinGPTStyle(TinyModule):
    """minGPT's configure_optimizers (karpathy/minGPT, mingpt/model.py): weights of Linear layers decay, LayerNorm /
    Embedding weights and biases do not, and every parameter must be placed."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
        self.groups = None

    def configure_optimizers(self):
        decay, no_decay = set(), set()
        for mn, m in self.named_modules():
            for pn, p in m.named_parameters():
                fpn = f"{mn}.{pn}" if mn else pn
                if pn.endswith("bias"):
                    no_decay.add(fpn)
                elif pn.endswith("weight") and isinstance(m, nn.Linear):
                    decay.add(fpn)
                elif pn.endswith("weight") and isinstance(m, (nn.LayerNorm, nn.Embedding)):
                    no_decay.add(fpn)
        param_dict = {pn: p for pn, p in self.named_parameters()}
        union_params = decay | no_decay
        assert len(decay & no_decay) == 0
        assert len(param_dict.keys() - union_params) == 0, f"not placed: {param_dict.keys() - union_params}"
        self.groups = sorted(decay), sorted(no_decay)
        return torch.optim.AdamW([
            {"params": [param_dict[pn] for pn in sorted(decay)], "weight_decay": 0.1},
            {"params": [param_dict[pn] for pn in sorted(no_decay)], "weight_decay": 0.0},
        ], lr=1e-2)


def test_mingpt_param_groups_by_name_and_type_train_the_masked_weights_with_their_decay():
    pl.seed_everything(0, verbose=False)
    module = MinGPTStyle()
    expected = (["net.0.weight", "net.3.weight"], ["net.0.bias", "net.1.bias", "net.1.weight", "net.3.bias"])
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False)
    seen = {}

    class Spy(Callback):
        def on_train_end(self, trainer, pl_module):
            seen["decay"] = trainer.optimizers[0].param_groups[0]
            seen["twin"] = pruner.score_optimizers

    before = [module.net[0].weight.detach().clone(), module.net[3].weight.detach().clone()]
    make_trainer(max_steps=4, callbacks=[pruner, Spy()]).fit(module)
    assert module.groups == expected
    masked = masked_tensors(module)
    assert ids(e.weight for e in masked) <= ids(seen["decay"]["params"]) and seen["decay"]["weight_decay"] == 0.1
    assert all(not torch.equal(b, e.weight) for b, e in zip(before, masked))  # they trained
    [twin] = seen["twin"]
    assert ids(twin.param_groups[0]["params"]) == ids(e.gate.scores for e in masked)


class NanoGPTStyle(TinyModule):
    """nanoGPT's configure_optimizers (karpathy/nanoGPT, model.py): every tensor of 2 or more dims decays."""

    def configure_optimizers(self):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay = [p for n, p in param_dict.items() if p.dim() < 2]
        self.counts = len(decay), sum(p.numel() for p in decay), len(nodecay)
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                                 lr=1e-2)


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_nanogpt_param_groups_by_dimension_hold_what_they_hold_without_the_masks(granularity):
    pl.seed_everything(0, verbose=False)
    plain = NanoGPTStyle()
    make_trainer(max_steps=1).fit(plain)
    pl.seed_everything(0, verbose=False)
    module = NanoGPTStyle()
    make_trainer(max_steps=3, callbacks=[MaskPruningCallback(0.5, selector=Selector(granularity=granularity),
                                                             output_layers=None)]).fit(module)
    assert module.counts == plain.counts == (2, 8 * 16 + 16 * 3, 2)


# ------------------------------------------------------------------------------------------------ manual optimization
class TinyGAN(pl.LightningModule):
    """Lightning's GAN pattern: manual optimization, a generator and a discriminator stepped each batch (toggled)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        noise = torch.randn(real.shape[0], 4)
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        self.toggle_optimizer(opt_g)
        g_loss = bce(self.discriminator(self.generator(noise)), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        fake = self.generator(noise).detach()
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

    def train_dataloader(self):
        data = torch.randn(48, 8, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3))


def test_a_gan_with_two_optimizers_follows_the_ramp_in_batches():
    pl.seed_everything(0, verbose=False)
    module = TinyGAN()
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False)
    reached, twins = [], []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            reached.append(pruner.sparsity_now)

        def on_train_end(self, trainer, pl_module):
            twins.extend(getattr(pruner, "score_optimizers", []))

    trainer = make_trainer(max_epochs=3, callbacks=[pruner, Spy()])
    trainer.fit(module)
    assert len(reached) == 18 and trainer.global_step == 36  # Lightning counts both optimizers' steps
    assert max(reached) == pytest.approx(0.5, abs=0.01)
    assert reached.index(max(reached)) == 12  # two thirds of the 18 batches, not of the 36 steps
    assert len(twins) == 2
    for part, twin in zip((module.generator, module.discriminator), twins):
        trained = ids(p for g in twin.param_groups for p in g["params"])
        assert trained == ids(e.gate.scores for e in masked_tensors(part))
        assert {int(state["step"]) for state in twin.state.values()} == {18}  # with its own optimizer, once a batch


class UntoggledGAN(TinyGAN):
    """The generator's loss flows through the discriminator, and nothing but the user's ``opt_d.zero_grad()``
    clears what it leaves in the discriminator's gradients."""

    def training_step(self, batch, batch_idx):
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        noise = torch.randn(real.shape[0], 4)
        bce = nn.functional.binary_cross_entropy_with_logits
        opt_g.zero_grad()
        self.manual_backward(bce(self.discriminator(self.generator(noise)), torch.ones(real.shape[0], 1)))
        opt_g.step()
        self.d_inputs = real, self.generator(noise).detach()
        opt_d.zero_grad()
        self.manual_backward(self.d_loss(*self.d_inputs))
        opt_d.step()

    def d_loss(self, real, fake):
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(self.discriminator(real), torch.ones(len(real), 1)) + bce(self.discriminator(fake),
                                                                              torch.zeros(len(fake), 1))


def test_the_users_zero_grad_reaches_the_scores_a_generator_loss_does_not_train_the_discriminators_scores():
    pl.seed_everything(0, verbose=False)
    module = UntoggledGAN()
    checked = []

    class Spy(Callback):  # before the pruning callback: the gradients the discriminator's scores step with
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if optimizer is not trainer.optimizers[1]:
                return
            scores = [e.gate.scores for e in masked_tensors(pl_module.discriminator)]
            expected = torch.autograd.grad(pl_module.d_loss(*pl_module.d_inputs), scores)
            checked.append(all(torch.allclose(s.grad, g, atol=1e-6) for s, g in zip(scores, expected)))

    make_trainer(max_steps=8, callbacks=[Spy(), MaskPruningCallback(0.5)]).fit(module)
    assert checked == [True] * 4


def test_a_gan_bounded_by_max_steps_ends_its_ramp_at_two_thirds():
    pl.seed_everything(0, verbose=False)
    pruner = MaskPruningCallback(0.5, schedule=Schedule("linear", update_every=1))
    targets = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            targets.append(pruner.plan.target)

    make_trainer(max_steps=24, callbacks=[pruner, Spy()]).fit(TinyGAN())  # 12 batches
    assert len(targets) == 12 and targets.index(0.5) == 8  # the ramp ends at batch 8 of 0..11


# ----------------------------------------------------------------------------------- AMP, clipping, accumulation
class Counting(Callback):
    """The number of batches that changed the masked weights and the scores."""

    def __init__(self):
        self.changed, self._before = [0, 0], None

    def _tensors(self, pl_module):
        masked = masked_tensors(pl_module)
        return [e.weight.detach().clone() for e in masked], [e.gate.scores.detach().clone() for e in masked]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._tensors(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for index, (before, after) in enumerate(zip(self._before, self._tensors(pl_module))):
            self.changed[index] += any(not torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("fused", [None, True])
def test_amp_skipped_steps_skip_the_scores_too(fused):
    """float16 AMP with a GradScaler whose first scales overflow: the scaler skips those steps for the weights and
    the scores alike, and both step together once the scale has come down. A fused Adam unscales inside its step
    (the scaler hands it the scale): the scores' copy is unscaled by the callback then."""
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(0, verbose=False)
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False,
                                 schedule=Schedule(update_every=100))  # no update moves the scores
    counting = Counting()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -40, growth_interval=1000)

    class LargeLoss(TinyModule):  # its scaled loss overflows float32 at the first scale
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1e4

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2, fused=fused)

    trainer = make_trainer(max_steps=8, callbacks=[pruner, counting],
                           plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(LargeLoss())
    weights, scores = counting.changed
    assert weights == scores and 0 < weights < 8, counting.changed


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_clipping_and_accumulation_reach_the_scores(precision):
    """gradient_clip_val bounds the scores' steps (by their own norm); with accumulate_grad_batches the scores step
    with the user's optimizer, once per accumulated batch."""
    pl.seed_everything(0, verbose=False)
    pruner = MaskPruningCallback(0.5, fold_on_fit_end=False, state=MaskState(score_dtype="float32"),
                                 optimizer=MaskOptimizer(lr=0.5))

    class SGDModule(TinyModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    spy = StepSpy()
    norms = []
    spy._after = lambda pl_module: norms.append(float(torch.cat([
        (b - e.gate.scores.detach()).flatten() for e, (b, _) in zip(masked_tensors(pl_module), spy._before)]).norm()))
    trainer = make_trainer(max_steps=3, accumulate_grad_batches=2, gradient_clip_val=1e-3, precision=precision,
                           callbacks=[spy, pruner])
    trainer.fit(SGDModule())
    assert trainer.global_step == 3 and len(norms) == 3
    assert max(norms) <= 0.5 * 1e-3 * 1.001 and min(norms) > 0.5 * 1e-3 * 0.9  # clipped to mask_lr * clip_val
