"""Accuracy against sparsity on Fashion-MNIST: lightning_masks against the pruners users would pick instead.

Every method trains the same model (same seed, same init, same batches) with the same optimizer, epochs and
cubic schedule in Lightning's ``Trainer``; only the pruning callback differs. Each finished run is appended
to ``<out>/<name>.jsonl`` (runs already there are skipped), then ``<name>.md`` and ``<name>.png`` are rendered
from that file.

Methods (``--methods``):
    dense                 no pruning
    model_pruning         Lightning's ModelPruning, global l1_unstructured; ``amount`` gives the exact count to
                          prune at each epoch's end so the cumulative sparsity follows the common schedule
    wns                   torch.ao.pruning.WeightNormSparsifier, per layer, element blocks, stepped as each
                          epoch starts (conv weights through their 2-D view)
    masks                 MaskPruningCallback(sparsity=s, start=, end=): the shipped defaults
    masks[k=v,...]        the same with options, e.g. ``masks[init=stddev]``, ``masks[rescale_gate=True]``
    gmp                   gradual magnitude pruning at the same cadence, schedule and selection: the callback with
                          its scores frozen (``mask_lr=0``; with ``rescale_gate`` every gate stays 1, so the
                          importance ``|w * gate|`` is ``|w|``)
    plain                 the seed article's plain form: no rescale (``rescale_gate=False``), every gate starts near
                          ``sigmoid(|w|)``, about one half
    gmp[k=v,...], plain[k=v,...]  the same with further callback options

Example:
    python benchmarks/quality.py --sparsities 0.9 0.99 --seeds 0 --methods dense model_pruning masks
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import multiprocessing
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn
from torch.ao.pruning import WeightNormSparsifier
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    append_jsonl,
    build_model,
    callback_arguments,
    callback_options,
    load_fashion_mnist,
    markdown_table,
    mean_std,
    prunable,
    read_jsonl,
    sparsity_counts,
    target_count,
    target_sparsity,
    zero_rows,
)
from common import callback_defaults as common_defaults

from lightning_masks import MaskPruningCallback, list_initializers

DEFAULT_METHODS = ["dense", "model_pruning", "wns", "gmp", "plain", "masks", *(f"masks[init={name}]" for name in list_initializers())]
KEY_FIELDS = ("model", "method", "sparsity", "seed", "epochs", "start", "end", "lr", "batch_size")


#: Callback settings added after runs were recorded, with the value that reproduces what those runs did (issue 17:
#: float32 scores, a keep buffer and a per-weight rescale, and no update budget).
ADDED_SINCE = {"score_dtype": "None", "compact": "False", "update_budget": "None"}


@functools.cache
def callback_defaults() -> str:
    """The callback's defaults as flat options (JSON of reprs), recorded with every ``masks`` run."""
    return json.dumps({name: repr(value) for name, value in common_defaults().items()})


# ------------------------------------------------------------------------------------------------ methods
def parse_method(spec: str, known: Iterable[str] | None = None) -> tuple[str, dict[str, Any]]:
    """Split ``name[k=v,...]`` into the name (one of ``known``, default :data:`METHODS`) and its options (values read
    as Python literals, else strings)."""
    known = sorted(METHODS if known is None else known)
    match = re.fullmatch(r"(\w+)(?:\[(.*)\])?", spec.strip())
    if not match or match[1] not in known:
        raise ValueError(f"unknown method {spec!r}; known: {known}, options as masks[init=stddev,...]")
    options = {}
    for item in filter(None, (match[2] or "").split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return match[1], options


class Plan:
    """The common schedule: ``final`` sparsity reached by a cubic ramp from epoch ``start`` to ``end``."""

    def __init__(self, final: float, start: int, end: int) -> None:
        self.final, self.start, self.end = final, start, end

    def target(self, epoch: int) -> float:
        return target_sparsity(self.final, epoch, self.start, self.end)

    def count(self, epoch: int, total: int) -> int:
        return target_count(self.final, epoch, self.start, self.end, total)


def dense(model: nn.Module, plan: Plan, **options: Any) -> list[Callback]:
    """No pruning."""
    return []


def model_pruning(model: nn.Module, plan: Plan, **options: Any) -> list[Callback]:
    """Lightning's ModelPruning (global L1); pruning at the end of epoch ``e`` reaches the target of ``e + 1``.

    An int ``amount`` is an exact count of the still-unpruned weights, so the incremental count keeps the
    cumulative sparsity exactly ``round(target * total)``.
    """
    parameters = [(module, "weight") for _, module in prunable(model)]
    total = sum(module.weight.numel() for module, _ in parameters)

    def amount(epoch: int) -> int:
        return plan.count(epoch + 1, total) - plan.count(epoch, total)

    return [ModelPruning("l1_unstructured", parameters_to_prune=parameters, amount=amount,
                         use_global_unstructured=True, make_pruning_permanent=True, verbose=0, **options)]


class FlatWeightNormSparsifier(WeightNormSparsifier):
    """``WeightNormSparsifier`` that prunes a conv weight through its 2-D view ``(out, in * kh * kw)``: the
    parent reads the last two dimensions as the matrix, which for a conv is one kernel."""

    def update_mask(self, module, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs):
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        if mask.dim() == 2:
            return super().update_mask(module, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block,
                                       **kwargs)
        holder = SimpleNamespace(mask=mask.detach().reshape(mask.shape[0], -1).clone())
        flat = SimpleNamespace(parametrizations=SimpleNamespace(**{tensor_name: [holder]}),
                               **{tensor_name: getattr(module, tensor_name).reshape(mask.shape[0], -1)})
        super().update_mask(flat, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block, **kwargs)
        mask.data = holder.mask.reshape(mask.shape).to(mask.dtype)


class SparsifierStepper(Callback):
    """Prepare a ``torch.ao.pruning`` sparsifier at setup, step it to the schedule as each epoch starts."""

    def __init__(self, plan: Plan, **options: Any) -> None:
        self.plan = plan
        self.sparsifier = FlatWeightNormSparsifier(sparse_block_shape=(1, 1), zeros_per_block=1, **options)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        layers = list(prunable(pl_module))
        self.sparsifier.prepare(pl_module, [{"tensor_fqn": f"{name}.weight"} for name, _ in layers])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for group in self.sparsifier.groups:
            group["sparsity_level"] = self.plan.target(trainer.current_epoch)
        self.sparsifier.step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sparsifier.squash_mask()


def wns(model: nn.Module, plan: Plan, **options: Any) -> list[Callback]:
    """torch.ao.pruning's WeightNormSparsifier, every layer to the target."""
    return [SparsifierStepper(plan, **options)]


def masks(model: nn.Module, plan: Plan, **options: Any) -> list[Callback]:
    """lightning_masks: the shipped defaults, with the common schedule and any options given."""
    return [MaskPruningCallback(**callback_arguments({"sparsity": plan.final, "start": plan.start, "end": plan.end,
                                                      **callback_options(options)}))]


#: The methods that run MaskPruningCallback, with the options that define them (fixed, not overridable).
MASK_METHODS: dict[str, dict[str, Any]] = {"masks": {}, "gmp": {"mask_lr": 0.0}, "plain": {"rescale_gate": False}}


def _masks_with(name: str) -> Callable[..., list[Callback]]:
    fixed = MASK_METHODS[name]

    def method(model: nn.Module, plan: Plan, **options: Any) -> list[Callback]:
        clash = sorted(set(options) & set(fixed))
        if clash:
            raise ValueError(f"{name} fixes {fixed}; options {clash} would change what it is (use masks[...])")
        return masks(model, plan, **fixed, **options)

    method.__doc__ = f"MaskPruningCallback with {fixed} and the common schedule."
    return method


METHODS: dict[str, Callable[..., list[Callback]]] = {
    "dense": dense, "model_pruning": model_pruning, "wns": wns, "masks": masks,
    "gmp": _masks_with("gmp"), "plain": _masks_with("plain"),
}


# ------------------------------------------------------------------------------------------------ one run
def train_loader(inputs: Tensor, targets: Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled in-memory batches (whole-batch indexing, no per-example collation), the same for every method."""
    dataset = TensorDataset(inputs, targets)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, targets: Tensor, chunk: int = 1000) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(inputs.split(chunk), targets.split(chunk)))
    return correct / len(targets)


def layer_zeros(model: nn.Module) -> dict[str, list[int]]:
    """Per prunable layer (by module name): ``[exact zeros, total]``."""
    return {row["name"].removesuffix(".weight"): [row["total"] - row["kept"], row["total"]]
            for row in zero_rows(model)}


def run_one(config: dict[str, Any], data: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
    """Train one configuration and return its record (test accuracy, measured sparsity, time)."""
    data = data if data is not None else DATA
    pl.seed_everything(config["seed"], verbose=False)
    model = build_model(config["model"], config["lr"])
    name, options = parse_method(config["method"])
    plan = Plan(config["sparsity"], config["start"], config["end"])
    callbacks = METHODS[name](model, plan, **options)
    trainer = pl.Trainer(max_epochs=config["epochs"], callbacks=callbacks,
                         accelerator=config.get("accelerator", "cpu"), devices=1, logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    began = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader(*data["train"], config["batch_size"], config["seed"]))
    seconds = time.perf_counter() - began
    zeros, total = sparsity_counts(model)
    cadence = {}  # the interval the auto cadence chose, and how many updates ran
    for callback in callbacks:
        if isinstance(callback, MaskPruningCallback):
            cadence = {"update_every": callback.plan.every, "updates": len(callback.plan.history["positions"])}
    return {**config, "accuracy": accuracy(model, *data["test"]), "zeros": zeros, "total": total,
            "target_zeros": round(config["sparsity"] * total), "achieved": zeros / total,
            "layers": layer_zeros(model), "seconds": round(seconds, 1), **cadence}


DATA: dict[str, tuple[Tensor, Tensor]] = {}  # the data set, loaded once before worker processes fork


def run_all(todo: list[dict[str, Any]], path: Path, jobs: int) -> None:
    """Run configurations (``jobs`` forked processes of one thread each), appending each record as it finishes."""
    def finished(record: dict[str, Any]) -> None:
        append_jsonl(path, record)
        print(f"{label(record):>28} s={record['sparsity']:<6} seed={record['seed']} "
              f"acc={100 * record['accuracy']:.2f} sparsity={100 * record['achieved']:.3f}% "
              f"({record['zeros'] - record['target_zeros']:+d}) {record['seconds']}s", flush=True)

    if jobs <= 1:
        for config in todo:
            finished(run_one(config))
        return
    with multiprocessing.get_context("fork").Pool(jobs, torch.set_num_threads, (1,), maxtasksperchild=1) as pool:
        for record in pool.imap_unordered(run_one, todo):
            finished(record)


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configurations to run, seed-major so a partial grid covers every method."""
    common = {"model": args.model, "epochs": args.epochs, "start": args.start, "end": args.end, "lr": args.lr,
              "batch_size": args.batch_size, "accelerator": args.accelerator}
    configs = []
    for seed in args.seeds:
        for sparsity in args.sparsities:
            for method in args.methods:
                is_dense = parse_method(method)[0] == "dense"
                if is_dense and sparsity != args.sparsities[0]:
                    continue
                defaults = callback_defaults() if parse_method(method)[0] in MASK_METHODS else ""
                configs.append({**common, "method": method, "sparsity": 0.0 if is_dense else sparsity, "seed": seed,
                                "defaults": defaults})
    return configs


def label(record: dict[str, Any]) -> str:
    """A run's method as it reads under today's defaults.

    A ``masks`` run made under other callback defaults is named by the options it differs in, e.g. the
    ``masks`` of session 1 becomes ``masks[update_every=epoch,rescale_gate=False,mask_lr=None]``, and an
    explicit option equal to today's default disappears from the name. Values are shown as options are
    written (strings unquoted). ``gmp`` and ``plain`` are named the same way, against today's defaults with
    their own fixed options.
    """
    name, options = parse_method(record["method"])
    if name not in MASK_METHODS:
        return record["method"]
    fixed = {k: repr(v) for k, v in MASK_METHODS[name].items()}
    current = {**json.loads(callback_defaults()), **fixed}
    recorded = json.loads(record.get("defaults") or "{}")
    if recorded:  # a setting added since the run: the run had what the setting's non-default value reproduces
        recorded = {**ADDED_SINCE, **recorded}
    ran = {**recorded, **fixed, **{k: repr(v) for k, v in options.items()}}
    differ = {k: v for k, v in ran.items() if current.get(k) != v}
    order = [*options, *(k for k in differ if k not in options)]
    shown = [k + "=" + differ[k].strip("'") for k in order if k in differ]
    return f"{name}[{','.join(shown)}]" if shown else name


def key(record: dict[str, Any]) -> tuple:
    """What identifies a run: its settings, with the method as :func:`label` names it."""
    return tuple(label(record) if field == "method" else record[field] for field in KEY_FIELDS)


# ------------------------------------------------------------------------------------------------ report
def collect(records: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Group records by ``(method, sparsity)``, later duplicates replacing earlier ones."""
    unique = {key(r): r for r in records}
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in unique.values():
        groups.setdefault((label(record), record["sparsity"]), []).append(record)
    return groups


def method_order(groups: dict, preferred: list[str]) -> list[str]:
    found = {method for method, _ in groups}
    return [m for m in preferred if m in found] + sorted(found - set(preferred))


def accuracy_cell(runs: list[dict[str, Any]]) -> str:
    mean, std = mean_std([100 * r["accuracy"] for r in runs])
    return f"{mean:.2f} ± {std:.2f} ({len(runs)})" if len(runs) > 1 else f"{mean:.2f} (1)"


def sparsity_cell(runs: list[dict[str, Any]]) -> str:
    off = max((r["zeros"] - r["target_zeros"] for r in runs), key=abs)
    exact = "exact" if off == 0 else f"off by {off:+d}"
    return f"{100 * runs[0]['achieved']:.3f}% ({exact})"


def tables(groups: dict, methods: list[str], sparsities: list[float]) -> str:
    """The accuracy table and the achieved-sparsity table."""
    header = ["method", *(f"{100 * s:g}%" for s in sparsities)]

    def rows(cell: Callable[[list], str], skip_dense: bool) -> list[list[str]]:
        result = []
        for method in methods:
            if method == "dense":
                if not skip_dense and (method, 0.0) in groups:
                    result.append([method, *([cell(groups[(method, 0.0)])] * len(sparsities))])
                continue
            result.append([method, *(cell(groups[(method, s)]) if (method, s) in groups else "—"
                                     for s in sparsities)])
        return result

    return ("Test accuracy (%), mean ± std (number of seeds):\n\n" + markdown_table(header, rows(accuracy_cell, False))
            + "\n\nAchieved sparsity, exact zeros over the pruned weights (`exact`: equal to round(target·N) "
            "in every seed):\n\n" + markdown_table(header, rows(sparsity_cell, True)))


def verdicts(groups: dict, candidate: str = "masks") -> str:
    """The issue's quality targets for ``candidate`` (the defaults: ``masks``), met or not, from the data."""

    def stats(method: str, sparsity: float) -> tuple[float, float, int] | None:
        runs = groups.get((method, sparsity))
        if not runs:
            return None
        mean, std = mean_std([100 * r["accuracy"] for r in runs])
        return mean, std, len(runs)

    lines = []
    checks = [(0.9, "model_pruning", 0.0), (0.95, "model_pruning", 0.0), (0.98, "dense", -0.3),
              (0.99, "model_pruning", 1.0), (0.995, "model_pruning", 1.5)]
    for sparsity, other, needed in checks:
        ours, theirs = stats(candidate, sparsity), stats(other, 0.0 if other == "dense" else sparsity)
        if ours is None or theirs is None:
            lines.append(f"| {100 * sparsity:g}% | − {other} ≥ {needed:+.1f} | not run | — |")
            continue
        gap, spread = ours[0] - theirs[0], max(ours[1], theirs[1])
        met = gap >= needed and (needed <= 0 or gap > spread)
        seeds = min(ours[2], theirs[2])
        note = f"gap {gap:+.2f}, spread {spread:.2f}, seeds {seeds}" + ("" if seeds >= 3 else " (target asks 3)")
        lines.append(f"| {100 * sparsity:g}% | − {other} ≥ {needed:+.1f} | {'met' if met else '**NOT met**'} "
                     f"| {note} |")
    inexact = sorted({label(r) for runs in groups.values() for r in runs if r["zeros"] != r["target_zeros"]})
    lines.append(f"| all | achieved sparsity exact | {'met' if not inexact else '**NOT met**'} | "
                 f"{'inexact: ' + ', '.join(inexact) if inexact else 'every run, every method'} |")
    return "| sparsity | target | verdict | evidence |\n|---|---|---|---|\n" + "\n".join(lines)


def gmp_verdicts(groups: dict, candidate: str = "masks", baseline: str = "gmp", needed: float = 1.0) -> str:
    """Issue 16's target for ``candidate``: at least ``needed`` points over same-cadence GMP at every sparsity
    where both ran, the gap larger than either's seed spread (sample std); Welch's p-value alongside."""
    from scipy.stats import ttest_ind

    lines = []
    for sparsity in sorted({s for m, s in groups if m == baseline}):
        ours, theirs = groups.get((candidate, sparsity)), groups.get((baseline, sparsity))
        if not ours or not theirs:
            continue
        a, b = [100 * r["accuracy"] for r in ours], [100 * r["accuracy"] for r in theirs]
        (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
        gap, spread = mean_a - mean_b, max(std_a, std_b)
        p = float(ttest_ind(a, b, equal_var=False).pvalue) if min(len(a), len(b)) > 1 else float("nan")
        met = gap >= needed and gap > spread and min(len(a), len(b)) >= 3
        lines.append(f"| {100 * sparsity:g}% | {mean_a:.2f} ± {std_a:.2f} ({len(a)}) | {mean_b:.2f} ± {std_b:.2f} "
                     f"({len(b)}) | {gap:+.2f} | {spread:.2f} | {p:.3g} | {'met' if met else '**NOT met**'} |")
    if not lines:
        return ""
    return (f"| sparsity | `{candidate}` | `{baseline}` | gap | spread | Welch p | ≥ {needed:+.1f}, beyond the spread, "
            "3 seeds |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines))


def plot(groups: dict, methods: list[str], path: Path, title: str) -> None:
    """Accuracy against density (log scale), one line per method, dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for method in methods:
        if method == "dense":
            if (method, 0.0) in groups:
                axes.axhline(mean_std([100 * r["accuracy"] for r in groups[(method, 0.0)]])[0], color="black",
                             linestyle="--", label="dense")
            continue
        points = sorted((s, mean_std([100 * r["accuracy"] for r in runs])) for (m, s), runs in groups.items()
                        if m == method)
        if points:
            axes.errorbar([1 - s for s, _ in points], [mean for _, (mean, _) in points],
                          yerr=[std for _, (_, std) in points], marker="o", capsize=3, label=method)
    axes.set_xscale("log")
    axes.invert_xaxis()
    axes.set_xlabel("density (1 − sparsity), log scale")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def render(path: Path, preferred: list[str], candidates: list[str]) -> Path:
    """Write ``<name>.md`` and ``<name>.png`` beside the JSONL file; return the markdown's path."""
    records = read_jsonl(path)
    groups = collect(records)
    methods = method_order(groups, preferred)
    sparsities = sorted({s for _, s in groups if s > 0})
    first = records[0] if records else {}
    setting = ", ".join(f"{field}={first[field]}" for field in KEY_FIELDS if field not in ("method", "sparsity",
                                                                                            "seed") and first)
    minutes = sum(r["seconds"] for r in records) / 60
    text = (f"# {path.stem}\n\nFashion-MNIST test set (10k), {setting}; {len(records)} runs, "
            f"{minutes:.0f} min of training.\n\n{tables(groups, methods, sparsities)}\n")
    for candidate in candidates:
        text += f"\nTargets of issue 5 for `{candidate}` (accuracy points):\n\n{verdicts(groups, candidate)}\n"
        against_gmp = gmp_verdicts(groups, candidate)
        if against_gmp:
            text += f"\nTarget of issue 16 for `{candidate}`: learned masks over same-cadence GMP:\n\n{against_gmp}\n"
    markdown = path.with_suffix(".md")
    markdown.write_text(text)
    if groups:
        plot(groups, methods, path.with_suffix(".png"), f"{path.stem}: accuracy against sparsity")
    return markdown


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99, 0.995])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model", default="lenet300", choices=["lenet300", "lenet5", "lenet5_caffe"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--start", type=int, default=1, help="epoch where the cubic ramp starts")
    parser.add_argument("--end", type=int, default=7, help="epoch where it reaches the final sparsity")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (forked processes)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every run (cpu, gpu)")
    parser.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results file stem (default quality_<model>)")
    parser.add_argument("--render-only", action="store_true", help="only rebuild the table and plot")
    parser.add_argument("--candidates", nargs="+", default=["masks"],
                        help="methods whose issue-5 targets the markdown checks (default: the shipped defaults)")
    parser.add_argument("--reuse", nargs="*", type=Path, default=[],
                        help="JSONL files whose runs of the same configuration are copied instead of re-run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for spec in args.methods:
        parse_method(spec)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    path = args.out / f"{args.name or 'quality_' + args.model}.jsonl"
    if not args.render_only:
        done = {key(r) for r in read_jsonl(path)}
        reusable = {key(r): r for source in args.reuse for r in read_jsonl(source)}
        for config in grid(args):
            if key(config) not in done and key(config) in reusable:
                append_jsonl(path, reusable[key(config)])
                done.add(key(config))
        todo = [c for c in grid(args) if key(c) not in done]
        print(f"{len(todo)} runs to do ({len(done)} in {path})", flush=True)
        DATA.update(load_fashion_mnist(args.data_root))
        run_all(todo, path, args.jobs)
    print(render(path, args.methods, args.candidates))


if __name__ == "__main__":
    main()
