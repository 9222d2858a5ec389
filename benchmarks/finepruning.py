"""Fine-pruning a pretrained network for a new task: where learned masks pay, against the pruners users would pick.

A network is pretrained on five Fashion-MNIST classes (0-4; the weights cached under ``<out>/cache``, which git
ignores), then its backbone (every layer but the classifier) is fine-pruned on the other five (5-9) under a new
dense head. The backbone's weight learning rate is a grid dimension: ``0`` (frozen with ``requires_grad_(False)``,
outside the optimizer), a small one (1e-4) and the usual one (1e-3); the head always trains at 1e-3 (Adam). Every
arm sees the same pretrained backbone, head init, batches and cubic ramp (over the first ``--end`` fraction of the
steps, or epochs for ModelPruning); only the pruning differs. Runs are appended to ``<out>/<name>.jsonl`` (runs
there are skipped), and ``<name>.md`` / ``<name>.png`` are rendered from it.

Arms (``--methods``, options as ``masks[k=v,...]`` like quality.py: a callback argument, a :class:`Selector` field
such as ``importance=gate``, or an initializer option as ``init.noise_scale=0.1`` / ``init.shift=-3``):
    dense          no pruning (fine-tuning only)
    gmp            gradual magnitude pruning by the callback: scores frozen (``mask_lr=0``), same cadence and ramp
    masks          MaskPruningCallback's defaults (``frozen="mask"``: binary masks over a frozen backbone)
    movement       movement-style: ``importance="gate"``, constant init, straight-through scores, regrowth
    oneshot        one-shot global magnitude pruning to the final sparsity at the first step, then fine-tuning
                   with the mask fixed (the callback with ``schedule="one_shot"``, ``mask_lr=0``)
    model_pruning  Lightning's ModelPruning, global L1 over the backbone, at each epoch's end to the schedule
    finetuning     MaskPruningCallback.finetuning(): the fine-pruning preset (soft gates over frozen weights,
                   gates from sigmoid(-3); with ``init.*`` options the init keeps the preset's shift)
    masks_soft     ``masks`` with the backbone left trainable in the optimizer at lr 0 where the grid says frozen
                   (the soft gate ``w * sigmoid(s) * keep`` then scales the kept weights: not a mask alone)

Example:
    python benchmarks/finepruning.py --model lenet300 --weight-lrs 0 1e-4 --sparsities 0.98 0.995 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    append_jsonl,
    callback_arguments,
    callback_options,
    load_fashion_mnist,
    markdown_table,
    mean_std,
    read_jsonl,
)
from quality import Plan, accuracy, layer_zeros, model_pruning, parse_method, train_loader

from lightning_masks import MaskPruningCallback, Selector, masked_tensors
from lightning_masks.masking.gate import gate_value
from lightning_masks.zoo import MLP, LeNet5

SOURCE, TARGET = range(0, 5), range(5, 10)  # pretraining classes, fine-pruning classes
KEY_FIELDS = ("model", "method", "weight_lr", "sparsity", "seed", "epochs", "end", "train_size", "pretrain_epochs")
PRETRAIN_EPOCHS = 3  # the pretraining length of records written before it was a field


# ------------------------------------------------------------------------------------------------ data, models
def task(data: dict[str, tuple[Tensor, Tensor]], classes: range, train_size: int | None = None) -> dict:
    """The splits restricted to ``classes``, labels renumbered from 0; the first ``train_size`` training images."""
    def part(inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        chosen = (targets >= classes.start) & (targets < classes.stop)
        return inputs[chosen], targets[chosen] - classes.start

    result = {name: part(*split) for name, split in data.items()}
    if train_size:
        result["train"] = tuple(t[:train_size] for t in result["train"])
    return result


def build(model: str) -> pl.LightningModule:
    """The five-class network (LeNet-300-100 or LeNet-5 with the first conv padded)."""
    if model == "lenet300":
        return MLP(in_features=784, hidden=(300, 100), num_classes=len(SOURCE))
    if model == "lenet5":
        return LeNet5(num_classes=len(SOURCE))
    raise ValueError(f"unknown model {model!r}: lenet300 or lenet5")


def trainer(epochs: int, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0)


def pretrained(model: str, data: dict, cache: Path, epochs: int) -> dict[str, Tensor]:
    """The network pretrained on the source classes (seed 0), read from ``cache`` or trained and cached."""
    path = cache / f"finepruning_{model}_pretrained_e{epochs}.pt"
    if path.exists():
        return torch.load(path)
    pl.seed_everything(0, verbose=False)
    network = build(model)
    source = task(data, SOURCE)
    trainer(epochs, []).fit(network, train_dataloaders=train_loader(*source["train"], 128, 0))
    print(f"pretrained {model} on classes 0-4: test accuracy {100 * accuracy(network, *source['test']):.2f}%",
          flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return network.state_dict()


class FinePruned(pl.LightningModule):
    """A pretrained backbone under a new dense head, the backbone trained at ``weight_lr`` (0: frozen by hand)."""

    def __init__(self, network: nn.Module, weight_lr: float, head_lr: float = 1e-3, freeze: bool = True) -> None:
        super().__init__()
        layers = list(network.net)
        classifier = layers[-1]
        self.backbone = nn.Sequential(*layers[:-1])
        self.head = nn.Linear(classifier.in_features, len(TARGET))
        self.weight_lr, self.head_lr = weight_lr, head_lr
        if weight_lr == 0 and freeze:
            self.backbone.requires_grad_(False)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.backbone(inputs))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(self(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": list(self.head.parameters()), "lr": self.head_lr}]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": self.weight_lr})
        return torch.optim.Adam(groups)


# ------------------------------------------------------------------------------------------------ arms
def _masks(plan: Plan, end: float, **options: Any) -> list[Callback]:
    options = {"sparsity": plan.final, "end": end, "exclude": ["head"], "frozen": "mask", **options}
    return [MaskPruningCallback(**callback_arguments(options))]


def _preset(plan: Plan, end: float, **options: Any) -> list[Callback]:
    return [MaskPruningCallback.finetuning(**callback_arguments({"sparsity": plan.final, "exclude": ["head"], **options}))]


MOVEMENT = Selector(importance="gate", straight_through=True, regrow=True)
ARMS: dict[str, Any] = {
    "dense": lambda plan, end, **o: [],
    "gmp": lambda plan, end, **o: _masks(plan, end, mask_lr=0.0, **o),
    "masks": lambda plan, end, **o: _masks(plan, end, **o),
    "movement": lambda plan, end, **o: _masks(plan, end, **{"selector": MOVEMENT, "init": "constant", **o}),
    "oneshot": lambda plan, end, **o: _masks(plan, end, schedule="one_shot", mask_lr=0.0, **o),
    "finetuning": _preset,
    "masks_soft": lambda plan, end, **o: _masks(plan, end, **o),
}
SOFT = {"masks_soft"}  # arms whose "frozen" backbone stays in the optimizer at lr 0


def callbacks_for(method: str, module: FinePruned, plan: Plan, end: float) -> list[Callback]:
    name, options = parse_method(method, [*ARMS, "model_pruning"])
    if name == "model_pruning":
        return model_pruning(module.backbone, plan, **options)
    base = {"selector": MOVEMENT} if name == "movement" else {}
    shift = MaskPruningCallback.FINETUNING_SHIFT if name == "finetuning" else None  # the preset's, kept with init.*
    return ARMS[name](plan, **{"end": end, **callback_options({**base, **options}, shift)})


class GateReport(Callback):
    """At fit end, before the masks fold: the gated model's test accuracy and the soft gates' factors on the kept
    weights (``sigmoid(s / T) * gate_scale``: 1 at the start with the rescale, at most ``gate_scale``). Placed before
    the pruner, whose ``on_fit_end`` folds."""

    def __init__(self, test: tuple[Tensor, Tensor]) -> None:
        self.test = test
        self.result: dict[str, Any] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masked = masked_tensors(pl_module)
        if not masked:
            return
        entries = [e for e in masked if e.gate.binary is None]
        self.result["accuracy_before_fold"] = accuracy(pl_module, *self.test)
        if entries:
            factors = torch.cat([gate_value(e.gate.scores, e.gate.temperature, e.gate.gate_scale)
                                 .expand_as(e.gate.keep)[e.gate.keep].flatten() for e in entries])
            ceiling = max(float(e.gate.gate_scale) if e.gate.gate_scale is not None else 1.0 for e in entries)
            self.result.update(factor_mean=round(float(factors.mean()), 3), factor_max=round(float(factors.max()), 3),
                               factor_above_2=round(float((factors > 2).float().mean()), 3),
                               factor_ceiling=round(ceiling, 3))


def backbone_zeros(module: FinePruned) -> tuple[int, int]:
    layers = layer_zeros(module.backbone)
    return sum(z for z, _ in layers.values()), sum(t for _, t in layers.values())


def run_one(config: dict[str, Any], data: dict, weights: dict[str, Tensor]) -> dict[str, Any]:
    pl.seed_everything(config["seed"], verbose=False)
    network = build(config["model"])
    network.load_state_dict(weights)
    module = FinePruned(network, config["weight_lr"], freeze=config["method"].split("[")[0] not in SOFT)
    epochs = config["epochs"]
    plan = Plan(config["sparsity"], 0, max(1, round(config["end"] * epochs)))
    report = GateReport(data["test"])
    callbacks = [report, *callbacks_for(config["method"], module, plan, config["end"])]
    began = time.perf_counter()
    trainer(epochs, callbacks).fit(module, train_dataloaders=train_loader(*data["train"], 128, config["seed"]))
    zeros, total = backbone_zeros(module)
    kept_equal = None
    if config["weight_lr"] == 0:  # a frozen backbone: its kept weights must be the pretrained ones, bit for bit
        pairs = [(p, weights[f"net.{n}"]) for n, p in module.backbone.named_parameters()]
        kept_equal = all(torch.equal(p[p != 0], w.to(p)[p != 0]) for p, w in pairs)
    return {**config, "accuracy": accuracy(module, *data["test"]), "zeros": zeros, "total": total,
            "target_zeros": round(config["sparsity"] * total), "kept_weights_unchanged": kept_equal,
            "seconds": round(time.perf_counter() - began, 1), **report.result}


# ------------------------------------------------------------------------------------------------ report
def key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(field, PRETRAIN_EPOCHS if field == "pretrain_epochs" else None) for field in KEY_FIELDS)


def lr_name(lr: float) -> str:
    return "frozen" if lr == 0 else f"{lr:g}"


def render(path: Path) -> Path:
    records = list({key(r): r for r in read_jsonl(path)}.values())
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], r["weight_lr"], r["sparsity"]), []).append(100 * r["accuracy"])
    methods = list(dict.fromkeys(r["method"] for r in records))
    lrs = sorted({r["weight_lr"] for r in records})
    sparsities = sorted({r["sparsity"] for r in records if r["sparsity"] > 0})

    def cell(values: list[float] | None) -> str:
        if not values:
            return "—"
        mean, std = mean_std(values)
        return f"{mean:.2f} ± {std:.2f} ({len(values)})" if len(values) > 1 else f"{mean:.2f} (1)"

    first = records[0] if records else {}
    text = (f"# {path.stem}\n\nFine-pruning on Fashion-MNIST: {first.get('model')} pretrained on classes 0-4 "
            f"({first.get('pretrain_epochs', PRETRAIN_EPOCHS)} epochs), its "
            f"backbone pruned on classes 5-9 under a new dense head; {first.get('epochs')} epochs on "
            f"{first.get('train_size') or 'all'} training images, ramp over the first {first.get('end')} of "
            f"training; test accuracy (%) on the 5k test images of classes 5-9, mean ± std (seeds). {len(records)} "
            f"runs, {sum(r['seconds'] for r in records) / 60:.0f} min of training.\n")
    for lr in lrs:
        rows = []
        for method in methods:
            if method == "dense":
                rows.append([method, *([cell(groups.get((method, lr, 0.0)))] * len(sparsities))])
            else:
                rows.append([method, *(cell(groups.get((method, lr, s))) for s in sparsities)])
        text += f"\n## backbone weight lr: {lr_name(lr)}\n\n" + markdown_table(
            ["arm", *(f"{100 * s:g}%" for s in sparsities)], rows) + "\n"
    for candidate in [m for m in ("masks", "masks_soft", "movement", "finetuning") if m in methods]:
        text += "\n" + gaps(groups, lrs, sparsities, candidate) + "\n"
    text += gate_table(records)
    inexact = sorted({r["method"] for r in records if r["sparsity"] > 0 and r["zeros"] != r["target_zeros"]})
    changed = sorted({r["method"] for r in records if r.get("kept_weights_unchanged") is False
                      and r["method"].split("[")[0] not in SOFT})  # a soft gate scales them by design
    exact = "exact in every run" if not inexact else f"inexact: {inexact}"
    text += (f"\nAchieved sparsity of the backbone: {exact}."
             f" Frozen backbone, kept weights equal to the pretrained ones bit for bit after folding: "
             f"{'every run' if not changed else 'NOT in ' + str(changed)} (but `masks_soft`, whose gates scale "
             f"them).\n")
    markdown = path.with_suffix(".md")
    markdown.write_text(text)
    plot(groups, methods, lrs, sparsities, path.with_suffix(".png"))
    return markdown


def gate_table(records: list[dict[str, Any]]) -> str:
    """The soft gates at fit end (runs that recorded them): the gated and folded accuracy, the kept weights'
    factors (mean, max, the fraction above 2) and their ceiling ``gate_scale``; means over seeds."""
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        if "factor_mean" in r:
            rows.setdefault((r["method"], r["weight_lr"], r["sparsity"]), []).append(r)
    if not rows:
        return ""

    def mean(group: list[dict], field: str, scale: float = 1.0) -> str:
        return f"{scale * sum(r[field] for r in group) / len(group):.2f}"

    table = markdown_table(
        ["arm", "weight lr", "sparsity", "seeds", "accuracy gated", "folded", "factor mean", "max", "share > 2",
         "ceiling"],
        [[m, lr_name(lr), f"{100 * s:g}%", str(len(g)), mean(g, "accuracy_before_fold", 100), mean(g, "accuracy", 100),
          mean(g, "factor_mean"), mean(g, "factor_max"), mean(g, "factor_above_2"), mean(g, "factor_ceiling")]
         for (m, lr, s), g in rows.items()])
    return ("\nSoft gates at fit end, before the fold (a kept weight's factor `sigmoid(s / T) * gate_scale` starts "
            "near 1 and cannot pass `gate_scale`; binary masks have none):\n\n" + table + "\n")


def gaps(groups: dict, lrs: list[float], sparsities: list[float], candidate: str = "masks") -> str:
    """Learned masks against GMP tuned over the weight lr grid (its best lr per sparsity) and against dense."""
    from scipy.stats import ttest_ind

    lines = ["| weight lr | sparsity | `{0}` | GMP at this lr | gap | GMP's best lr | gap | dense | gap | Welch p "
             "(vs GMP here) |".format(candidate), "|" + "---|" * 10]
    for lr in lrs:
        for s in sparsities:
            ours = groups.get((candidate, lr, s))
            if not ours:
                continue
            mean = mean_std(ours)[0]
            here = groups.get(("gmp", lr, s))
            tuned = max(((groups[("gmp", lr_, s)], lr_) for lr_ in lrs if ("gmp", lr_, s) in groups),
                        key=lambda item: mean_std(item[0])[0], default=None)
            dense = groups.get(("dense", lr, 0.0))
            p = (f"{ttest_ind(ours, here, equal_var=False).pvalue:.2g}" if here and min(len(ours), len(here)) > 1
                 else "—")

            def gap(values: list[float] | None) -> str:
                return f"{mean - mean_std(values)[0]:+.2f}" if values else "—"

            def shown(values: list[float] | None) -> str:
                if not values:
                    return "—"
                m, sd = mean_std(values)
                return f"{m:.2f} ± {sd:.2f}"

            lines.append(f"| {lr_name(lr)} | {100 * s:g}% | {shown(ours)} | {shown(here)} | {gap(here)} | "
                         f"{lr_name(tuned[1]) if tuned else '—'}: {shown(tuned[0]) if tuned else '—'} | "
                         f"{gap(tuned[0] if tuned else None)} | {shown(dense)} | {gap(dense)} | {p} |")
    return f"Gaps of `{candidate}` (points; dense with a frozen backbone trains the head only):\n\n" + "\n".join(lines)


def plot(groups: dict, methods: list[str], lrs: list[float], sparsities: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 4.5), squeeze=False, sharey=True)
    for axis, lr in zip(axes[0], lrs):
        for method in methods:
            if method == "dense":
                if ("dense", lr, 0.0) in groups:
                    axis.axhline(mean_std(groups[("dense", lr, 0.0)])[0], color="black", linestyle="--", label="dense")
                continue
            points = [(s, mean_std(groups[(method, lr, s)])) for s in sparsities if (method, lr, s) in groups]
            if points:
                axis.errorbar([1 - s for s, _ in points], [m for _, (m, _) in points],
                              yerr=[sd for _, (_, sd) in points], marker="o", capsize=3, label=method)
        axis.set_xscale("log")
        axis.invert_xaxis()
        axis.set_title(f"backbone weight lr {lr_name(lr)}")
        axis.set_xlabel("density (1 − sparsity), log scale")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), classes 5-9")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet300", choices=["lenet300", "lenet5"])
    parser.add_argument("--methods", nargs="+", default=["dense", "gmp", "masks", "movement", "oneshot",
                                                          "model_pruning"])
    parser.add_argument("--weight-lrs", nargs="+", type=float, default=[0.0, 1e-4, 1e-3])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99, 0.995])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3, help="fine-pruning epochs")
    parser.add_argument("--end", type=float, default=2 / 3, help="fraction of training where the ramp ends")
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    parser.add_argument("--train-size", type=int, default=None, help="fine-pruning training images (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results stem (default finepruning_<model>)")
    parser.add_argument("--render-only", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    path = args.out / f"{args.name or 'finepruning_' + args.model}.jsonl"
    if not args.render_only:
        data = load_fashion_mnist()
        weights = pretrained(args.model, data, args.out / "cache", args.pretrain_epochs)
        target = task(data, TARGET, args.train_size)
        done = {key(r) for r in read_jsonl(path)}
        common = {"model": args.model, "epochs": args.epochs, "end": round(args.end, 4), "train_size": args.train_size,
                  "pretrain_epochs": args.pretrain_epochs}
        todo = []
        for seed in args.seeds:
            for lr in args.weight_lrs:
                for s in args.sparsities:
                    for method in args.methods:
                        if method == "dense" and s != args.sparsities[0]:
                            continue
                        config = {**common, "method": method, "weight_lr": lr, "seed": seed,
                                  "sparsity": 0.0 if method == "dense" else s}
                        if key(config) not in done:
                            todo.append(config)
                            done.add(key(config))
        print(f"{len(todo)} runs to do", flush=True)
        for config in todo:
            record = run_one(config, target, weights)
            append_jsonl(path, record)
            print(f"{record['method']:>14} lr={lr_name(record['weight_lr']):>6} s={record['sparsity']:<6} "
                  f"seed={record['seed']} acc={100 * record['accuracy']:.2f} "
                  f"({record['zeros'] - record['target_zeros']:+d}) {record['seconds']}s", flush=True)
    print(render(path))


if __name__ == "__main__":
    main()
