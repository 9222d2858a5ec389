"""What the masks cost: training-step and evaluation-step time and memory relative to dense, and one mask update.

Plain loops (forward, backward, ``optimizer.step``) on the bare networks, no Lightning loop, so the numbers are
about the masking itself. Every method trains with ``torch.optim.Adam(net.parameters())`` as a user would write it.
Methods, each on its own copy of the same network, 90% sparse:

    dense              the plain network
    dense (fused)      the same with ``Adam(fused=True)``: the baseline for ``masks`` at equal optimizer kernels
    prune              ``torch.nn.utils.prune`` global L1 masks (what Lightning's ModelPruning installs)
    masks              ``lightning_masks.attach(rescale=True, score_dtype=torch.bfloat16, compact=True)`` +
                       ``Selector()`` + ``ScoreOptimizers``, what ``MaskPruningCallback()`` installs: ``w *
                       sigmoid(s) * scale`` with bfloat16 scores, the keep bits packed apart and one scale a tensor
                       (8.125 bytes of mask state a weight), scores trained by the user's Adam (``mask_lr=None``; the
                       callback's default steps them with a copy of it, the same kernel), which ``ScoreOptimizers``
                       switches to torch's fused kernel (CPU Adam, no choice made)
    masks (20 B state) the same with float32 state: float32 scores, the packed keep bits and a float32
                       scale per weight (``attach(rescale=True)``)
    masks (Adam loop)  the same masks with the Adam left as given (torch's per-tensor loop on CPU)
    masks, scores frozen   ``masks`` with the scores not trained: the gate's cost without its score gradient and
                       the scores' Adam update
    masks, gate off    ``masks`` with every gate disabled (``MaskGate.enabled = False``) and the scores frozen:
                       what the parametrization alone costs

Methods are interleaved (rotated each round) and each time is the median over rounds after warm-up.
Memory is measured in bytes of tensors: the persistent state (parameters, gradients, optimizer state, buffers
and masks) plus the tensors autograd saves for backward in one step (deduplicated by storage), the part that
grows with the masks. Writes ``results/overhead.md`` and ``results/overhead.json``.

Times are this thread's CPU time (``time.thread_time``), robust to other processes on shared cores.

``Lightning fit`` times the same comparison as a Lightning user meets it: ``Trainer.fit`` of the benchmark's
LightningModule (its own Adam) with no callback, with ``ModelPruning`` and with ``MaskPruningCallback``, the
callbacks set up as in ``quality.py`` to reach 90% at the end of the first epoch; a step's time is the CPU time of
a later epoch over its steps (loop, hooks and epoch-end work included), the fits interleaved.

Example:
    python benchmarks/overhead.py            # about 4 minutes on one core
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality
from common import RESULTS, build_model, markdown_table, prunable, sparsity_counts

import lightning_masks
from lightning_masks.lightning import ScoreOptimizers

SPARSITY = 0.9
INPUT = {"lenet300": (784,), "lenet5": (1, 28, 28)}


# ------------------------------------------------------------------------------------------------ methods
def with_prune(net: nn.Module) -> nn.Module:
    """Install global L1 masks at 90% (forward pre-hooks computing ``weight_orig * weight_mask``)."""
    parameters = [(module, "weight") for _, module in prunable(net)]
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=SPARSITY)
    return net


def with_masks(net: nn.Module, train_scores: bool = True, gate: bool = True, compact: bool = True) -> nn.Module:
    """Attach our masks as the callback does (``rescale_gate`` on, bfloat16 compact state; ``compact=False``: float32
    state, a scale per weight) and select 90% of them; for the breakdown rows, freeze the scores or disable
    the gates."""
    options = {"score_dtype": torch.bfloat16, "compact": True} if compact else {}
    masked = lightning_masks.attach(net, rescale=True, **options)
    lightning_masks.Selector()(masked, SPARSITY)
    for entry in masked:
        entry.gate.scores.requires_grad_(train_scores)
        entry.gate.enabled = gate
    return net


def fuse(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ScoreOptimizers([optimizer], lightning_masks.masked_tensors(net))


#: name -> (network transform, optimizer setup after ``Adam(net.parameters())``).
METHODS: dict[str, tuple[Callable[[nn.Module], nn.Module], Callable[[nn.Module, torch.optim.Optimizer], None]]] = {
    "dense": (lambda net: net, lambda net, optimizer: None),
    "dense (fused)": (lambda net: net, lambda net, optimizer: optimizer.param_groups[0].update(fused=True)),
    "prune": (with_prune, lambda net, optimizer: None),
    "masks": (with_masks, fuse),
    "masks (20 B state)": (lambda net: with_masks(net, compact=False), fuse),
    "masks (Adam loop)": (with_masks, lambda net, optimizer: ScoreOptimizers(
        [optimizer], lightning_masks.masked_tensors(net), fuse=False)),
    "masks, scores frozen": (lambda net: with_masks(net, train_scores=False), fuse),
    "masks, gate off": (lambda net: with_masks(net, train_scores=False, gate=False), fuse),
}


class Case:
    """One method on one network copy, with its optimizer and a fixed batch."""

    def __init__(self, method: str, net: nn.Module, inputs: Tensor, targets: Tensor) -> None:
        transform, setup = METHODS[method]
        self.net, self.inputs, self.targets = transform(net), inputs, targets
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        setup(self.net, self.optimizer)

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.net(self.inputs), self.targets).backward()
        self.optimizer.step()


def make_cases(model: str, batch: int, methods: list[str]) -> dict[str, Case]:
    torch.manual_seed(0)
    base = build_model(model).net
    inputs, targets = torch.randn(batch, *INPUT[model]), torch.randint(0, 10, (batch,))
    return {name: Case(name, copy.deepcopy(base), inputs, targets) for name in methods}


# ------------------------------------------------------------------------------------------------ timing
def rotated(names: Sequence[str], index: int) -> list[str]:
    """``names`` started at position ``index`` (wrapping): each round of an interleaved timing begins elsewhere."""
    start = index % len(names)
    return [*names[start:], *names[:start]]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, repeat: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed ``repeat`` calls at a time, methods rotated per round.

    The clock is this thread's CPU time (torch runs on one thread here), so other processes sharing the cores
    do not inflate the numbers.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in rotated(names, index):
            began = time.thread_time()
            for _ in range(repeat):
                fns[name]()
            samples[name].append((time.thread_time() - began) / repeat)
    return {name: statistics.median(values) for name, values in samples.items()}


def evaluator(net: nn.Module, inputs: Tensor, batches: int, cached: bool = False) -> Callable[[], None]:
    """One evaluation pass of ``batches`` batches (no grad, eval mode); ``cached`` computes the masked weights
    once for the whole pass (``parametrize.cached()``) instead of once per batch."""

    @torch.no_grad()
    def run() -> None:
        with parametrize.cached() if cached else contextlib.nullcontext():
            for _ in range(batches):
                net(inputs)

    net.eval()
    return run


# ------------------------------------------------------------------------------------------------ memory
def tensor_bytes(tensors: list[Tensor], seen: set[int]) -> int:
    """Bytes of the tensors' storages not in ``seen`` (which is updated)."""
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def memory(case: Case) -> dict[str, int]:
    """Persistent bytes (parameters, grads, optimizer state, buffers) and bytes saved for backward in one step."""
    saved: list[Tensor] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(tensor)
        return tensor

    case.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = nn.functional.cross_entropy(case.net(case.inputs), case.targets)
    loss.backward()
    case.optimizer.step()
    params = list(case.net.parameters())
    state = [v for s in case.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    seen: set[int] = {case.inputs.untyped_storage().data_ptr()}
    persistent = tensor_bytes(params + [p.grad for p in params if p.grad is not None] + state
                             + list(case.net.buffers()), seen)
    return {"persistent": persistent, "saved": tensor_bytes(saved, seen)}


# ------------------------------------------------------------------------------------------------ report
def measure_train(model: str, batch: int, rounds: int, repeat: int) -> dict:
    """Training-step times and memory of every method, and the mask update, for one model and batch size."""
    cases = make_cases(model, batch, list(METHODS))
    train = interleaved({name: case.train_step for name, case in cases.items()}, rounds, repeat)
    mem = {name: memory(case) for name, case in cases.items()}
    return {"model": model, "batch": batch, "rounds": rounds, "repeat": repeat, "train_s": train, "memory": mem,
            "update_s": measure_update(cases["masks"].net, max(rounds // 2, 5))}


def measure_update(net: nn.Module, rounds: int) -> dict[str, float]:
    """Seconds per mask update on the 90%-sparse masks: re-selecting 90% (``again``), raising 80% -> 90% (``raise``,
    the keep bits restored to the 80% state before each, a copy included in the time) and re-selecting with
    ``regrow=True`` (every entry competes)."""
    masked = lightning_masks.masked_tensors(net)
    before = [entry.gate.keep.clone() for entry in masked]
    lightning_masks.Selector()(masked, SPARSITY - 0.1)
    at_80 = [entry.gate.keep.clone() for entry in masked]

    def raise_90() -> None:
        for entry, keep in zip(masked, at_80):
            entry.gate.set_keep(keep)
        lightning_masks.Selector()(masked, SPARSITY)

    times = interleaved({"again": lambda: lightning_masks.Selector()(masked, SPARSITY), "raise": raise_90,
                         "regrow": lambda: lightning_masks.Selector(regrow=True)(masked, SPARSITY)}, rounds, 1)
    for entry, keep in zip(masked, before):
        entry.gate.set_keep(keep)
    return times


def measure_eval(model: str, batch: int, batches: int, rounds: int) -> dict:
    """Per-batch evaluation time of every method (ours also under ``parametrize.cached()``) for one model."""
    cases = make_cases(model, batch, ["dense", "prune", "masks"])
    evals = {name: evaluator(case.net, case.inputs, batches) for name, case in cases.items()}
    evals["masks (cached)"] = evaluator(cases["masks"].net, cases["masks"].inputs, batches, cached=True)
    per_pass = interleaved(evals, rounds, 1, warmup=1)
    return {"model": model, "batch": batch, "batches": batches,
            "eval_s": {name: seconds / batches for name, seconds in per_pass.items()}}


# ------------------------------------------------------------------------------------------------ Lightning fit
FIT_METHODS = ("dense", "model_pruning", "masks")


class EpochClock(pl.Callback):
    """This thread's CPU time of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.began = time.thread_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.thread_time() - self.began)


def fit_step(model: str, method: str, batch: int, steps: int, epochs: int = 3) -> tuple[float, float]:
    """``(seconds per step, final sparsity)`` of a Lightning fit; the step's time is the fastest epoch after the
    first, which prunes to 90% (``quality.py``'s callbacks on a ramp ending at epoch 1)."""
    torch.manual_seed(0)
    module = build_model(model)
    inputs, targets = torch.randn(batch * steps, *INPUT[model]), torch.randint(0, 10, (batch * steps,))
    clock = EpochClock()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[*quality.METHODS[method](module, quality.Plan(SPARSITY, 0, 1)),
                                                       clock],
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, quality.train_loader(inputs, targets, batch, seed=0))
    zeros, total = sparsity_counts(module)
    return min(clock.seconds[1:]) / steps, zeros / total


def measure_fit(model: str, batch: int, steps: int, rounds: int) -> dict:
    """Median seconds per step of each method's Lightning fit, fits interleaved (method order rotated per round)."""
    samples: dict[str, list[float]] = {name: [] for name in FIT_METHODS}
    for index in range(rounds):
        for name in rotated(FIT_METHODS, index):
            samples[name].append(fit_step(model, name, batch, steps)[0])
    return {"model": model, "batch": batch, "steps": steps, "rounds": rounds,
            "step_s": {name: statistics.median(values) for name, values in samples.items()}}


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×"


def render(results: list[dict], evaluations: list[dict], fits: list[dict]) -> str:
    """Markdown: train and memory per model/batch, eval per model, the update against a step."""
    header = ["model", "batch", "method", "train step", "× dense", "× dense (fused)", "saved for backward", "× dense",
              "total memory", "× dense"]
    rows = []
    for r in results:
        dense_mem = r["memory"]["dense"]
        for name, seconds in r["train_s"].items():
            mem = r["memory"][name]
            rows.append([r["model"], str(r["batch"]), name, f"{1e3 * seconds:.2f} ms",
                         ratio(seconds, r["train_s"]["dense"]), ratio(seconds, r["train_s"]["dense (fused)"]),
                         f"{mem['saved'] / 2**20:.2f} MiB",
                         ratio(mem["saved"], dense_mem["saved"]),
                         f"{(mem['saved'] + mem['persistent']) / 2**20:.2f} MiB",
                         ratio(mem["saved"] + mem["persistent"], dense_mem["saved"] + dense_mem["persistent"])])
    eval_rows = [[r["model"], str(r["batch"]), name, f"{1e3 * seconds:.2f} ms", ratio(seconds, r["eval_s"]["dense"])]
                 for r in evaluations for name, seconds in r["eval_s"].items()]
    fit_rows = [[r["model"], str(r["batch"]), name, f"{1e3 * seconds:.2f} ms", ratio(seconds, r["step_s"]["dense"])]
                for r in fits for name, seconds in r["step_s"].items()]
    update_rows = []
    for r in results:
        step = r["train_s"]["masks"]
        update_rows.append([r["model"], str(r["batch"])]
                           + [f"{1e3 * r['update_s'][k]:.2f} ms ({ratio(r['update_s'][k], step)})"
                              for k in ("again", "raise", "regrow")] + [f"{1e3 * step:.2f} ms"])
    return ("# Overhead of the masks (CPU, one thread, medians)\n\n"
            f"`python benchmarks/overhead.py`; {SPARSITY:.0%} sparse; torch {torch.__version__}; thread CPU time, "
            f"median of {results[0]['rounds']} rounds of {results[0]['repeat']} steps after warm-up.\n\n"
            "## Training step (forward, backward, Adam step)\n\n"
            "`× dense` compares with the user's network and optimizer as written; `× dense (fused)` with the dense network "
            "under the fused Adam kernel that `ScoreOptimizers` gives `masks`: the cost of the masks alone.\n\n"
            + markdown_table(header, rows)
            + "\n\n## Lightning fit (`Trainer.fit`, the module's own Adam), per training step at 90%\n\n"
            + (f"Median of {fits[0]['rounds']} interleaved fits of {fits[0]['steps']} steps an epoch; each fit's fastest "
               "epoch after the pruning one.\n\n" if fits else "")
            + markdown_table(["model", "batch", "method", "train step", "× dense"], fit_rows)
            + f"\n\n## Evaluation step (no grad), per batch of a {evaluations[0]['batches']}-batch pass\n\n"
            + markdown_table(["model", "batch", "method", "eval step", "× dense"], eval_rows)
            + "\n\n## One mask update (`Selector()(masked_tensors(model), 0.9)`), in masked training steps\n\n"
            "`again`: re-selecting 90% on 90%-sparse masks; `raise`: 80% -> 90%; `regrow`: `Selector(regrow=True)` "
            "at 90% (every entry competes).\n\n"
            + markdown_table(["model", "batch", "again (× step)", "raise (× step)", "regrow (× step)",
                              "train step (masks)"], update_rows) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=sorted(INPUT))
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--eval-batch", type=int, default=1000)
    parser.add_argument("--eval-batches", type=int, default=5, help="batches per timed evaluation pass")
    parser.add_argument("--eval-rounds", type=int, default=10, help="timed evaluation passes per method")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per method (the median is taken)")
    parser.add_argument("--repeat", type=int, default=4, help="steps per timed round")
    parser.add_argument("--fit-batch", type=int, default=128, help="batch of the Lightning fits")
    parser.add_argument("--fit-steps", type=int, default=100, help="steps an epoch of each Lightning fit")
    parser.add_argument("--fit-rounds", type=int, default=5, help="fits per method (the median is taken)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    results, evaluations, fits = [], [], []
    for model in args.models:
        for batch in args.batches:
            results.append(measure_train(model, batch, args.rounds, args.repeat))
            print(f"{model} batch {batch}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in
                                                          results[-1]["train_s"].items()), flush=True)
        evaluations.append(measure_eval(model, args.eval_batch, args.eval_batches, args.eval_rounds))
        if args.fit_rounds:
            fits.append(measure_fit(model, args.fit_batch, args.fit_steps, args.fit_rounds))
            print(f"{model} fit: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in fits[-1]["step_s"].items()),
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({"train": results, "eval": evaluations, "fit": fits}, indent=1))
    text = render(results, evaluations, fits)
    (args.out / "overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
