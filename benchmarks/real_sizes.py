"""Dense against masks at the sizes users train, in a Lightning fit: step time, training state, peak memory, updates.

Models (random init, random data, AdamW lr 1e-3, ``Trainer.fit`` with no logger, checkpointing or progress bar):

    bert        transformers ``BertForSequenceClassification``: hidden 256, 4 layers, 4 heads, FFN 1024, vocab 8192,
                sequence 128, batch 16 (issue 17's model); every Linear masked (the defaults)
    gpt2        transformers ``GPT2LMHeadModel``: 256 wide, 4 layers, 4 heads, vocab 8192, sequence 128, batch 8; the
                blocks' ``Conv1D`` weights masked (``targets``: ``c_attn``, ``c_proj``, ``c_fc``; the tied LM head not)
    resnet      a ResNet-18 layout at half width (32-64-128-256 channels, two basic blocks a stage, BatchNorm,
                projection shortcuts; written here), 32x32 inputs, batch 32; every Conv2d and Linear masked
    tiny_gpt2   GPT-2 at 64 wide, 2 layers, vocab 1024, sequence 32, batch 4: the short fits of issue 17 (50 steps)
    tiny_bert   BERT at hidden 64, 2 layers, FFN 256, vocab 1024, sequence 32, batch 4 (50 steps)
    lenet300    LeNet-300-100 (benchmarks/common.py), batch 128, 784 random inputs

Methods, each fit in its own forked process (so its peak RSS is its own), one after the other:

    dense         no callback
    masks         ``MaskPruningCallback(0.9)``: the defaults (bfloat16 scores, one scale a tensor, keep bits packed
                  eight a byte; the update cadence a function of the fit's configuration, ``plan.auto_interval``)
    masks_budget  ``MaskPruningCallback(0.9, schedule=Schedule(update_budget=0.05))``: the opt-in update budget, which spaces updates
                  by their measured cost (the runs then differ)
    masks_before  ``MaskPruningCallback(0.9, state=MaskState(score_dtype=None, compact=False))``: float32 scores and a float32 scale
                  per weight

Measured per fit:

* step time: from each ``on_train_batch_start`` to its ``on_train_batch_end`` (the mask update, made in the
  callback's ``on_train_batch_start``, included): this thread's CPU time with one CPU thread (the default: other
  processes on the shared cores do not inflate it), else wall time (CUDA synchronised at both ends on a GPU). ``whole fit``: the
  mean over every step but the first; ``after ramp``: the median over the steps after the ramp (the last third);
* training state: bytes of the parameters, their gradients, the optimizer state and the buffers, counted from the
  tensors after the last optimizer step (gradients still held), each storage once; ``mask B/w``: the masks' share
  of it (scores, their gradient and optimizer state, the gates' buffers) per masked weight;
* peak memory: on CPU the fit process's peak RSS above its RSS before the model was built (``getrusage`` of the
  child); on a GPU ``torch.cuda.max_memory_allocated``;
* mask updates: their number, the interval the auto cadence chose, and the time spent in them (the callback's
  ``_update``, timed) as a share of the fit's training time (the sum of the step times).

Writes ``results/real_sizes.json``, ``real_sizes.md`` and ``real_sizes.png`` (``--out``, ``--name``).

Example:
    python benchmarks/real_sizes.py                                   # CPU, one thread, every model: ~15 min
    python benchmarks/real_sizes.py --accelerator gpu --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, build_model, callback_arguments, markdown_table

from lightning_masks import MaskPruningCallback, masked_tensors

SPARSITY = 0.9
METHODS = ("dense", "masks", "masks_budget", "masks_before")
OPTIONS = {"masks": {}, "masks_budget": {"update_budget": 0.05}, "masks_before": {"score_dtype": None, "compact": False}}


# ------------------------------------------------------------------------------------------------ models
def conv_bn(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN, ReLU between and after the residual sum; a 1x1 conv-BN shortcut
    where the shape changes (He et al. 2016, option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3, 1))
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's layout (four stages of two basic blocks) with ``widths`` channels, for 32x32 images."""

    def __init__(self, widths=(32, 64, 128, 256), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, widths[0], 3, 1), nn.ReLU()]
        cin = widths[0]
        for stage, width in enumerate(widths):
            for block in range(2):
                layers.append(BasicBlock(cin, width, 2 if stage and not block else 1))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


@dataclass
class Spec:
    """A model at one size: how to build it, a batch of random data, its loss, what to mask, how many steps."""

    build: Callable[[], nn.Module]
    data: Callable[[int, torch.Generator], tuple[Tensor, ...]]  # (number of examples, generator) -> tensors
    loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
    batch: int
    steps: int
    targets: list[str] | None = None
    rounds: int = 1  # fits of each method, interleaved (the medians are reported): more for small, noisy fits


def bert(hidden: int, layers: int, ffn: int, vocab: int, seq: int) -> Spec:
    def build() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(hidden // 64, 2), intermediate_size=ffn,
                            max_position_embeddings=max(seq, 128), num_labels=2)
        return BertForSequenceClassification(config)

    def data(n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        return torch.randint(0, vocab, (n, seq), generator=generator), torch.randint(0, 2, (n,), generator=generator)

    return Spec(build, data, lambda model, batch: model(input_ids=batch[0], labels=batch[1]).loss, 0, 0)


def gpt2(width: int, layers: int, vocab: int, seq: int) -> Spec:
    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=max(width // 64, 2),
                            n_positions=max(seq, 128))
        return GPT2LMHeadModel(config)

    def data(n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randint(0, vocab, (n, seq), generator=generator),)

    return Spec(build, data, lambda model, batch: model(input_ids=batch[0], labels=batch[0]).loss, 0, 0,
                ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"])


def resnet() -> Spec:
    def data(n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)

    return Spec(ResNet, data, lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1]), 0, 0)


def lenet300() -> Spec:
    def data(n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        return torch.randn(n, 784, generator=generator), torch.randint(0, 10, (n,), generator=generator)

    return Spec(lambda: build_model("lenet300").net, data,
                lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1]), 0, 0)


def sized(spec: Spec, batch: int, steps: int, rounds: int = 1) -> Spec:
    spec.batch, spec.steps, spec.rounds = batch, steps, rounds
    return spec


MODELS: dict[str, Callable[[], Spec]] = {
    "bert": lambda: sized(bert(256, 4, 1024, 8192, 128), 16, 45),
    "gpt2": lambda: sized(gpt2(256, 4, 8192, 128), 8, 45),
    "resnet": lambda: sized(resnet(), 32, 45),
    "tiny_gpt2": lambda: sized(gpt2(64, 2, 1024, 32), 4, 50, rounds=5),
    "tiny_bert": lambda: sized(bert(64, 2, 256, 1024, 32), 4, 50, rounds=5),
    "lenet300": lambda: sized(lenet300(), 128, 150, rounds=3),
}


# ------------------------------------------------------------------------------------------------ one fit
class Task(pl.LightningModule):
    """A model and its loss, trained with AdamW."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.loss_fn(self.model, tuple(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: The clock of step and update times: this thread's CPU time on a CPU with one torch thread (other processes on
#: shared cores do not inflate it; the loop, data loading and optimizer all run in this thread), else wall time.
CLOCK = {"now": time.perf_counter}


def now() -> float:
    return CLOCK["now"]()


class Clock(Callback):
    """Wall time of each training step (put first: the mask update of the callback's batch start is inside it);
    the training state counted after the last optimizer step."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.state: dict[str, int] = {}
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        synchronize()
        self._start = now()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        synchronize()
        self.steps.append(now() - self._start)
        if trainer.global_step == trainer.max_steps:
            scores = [o for c in trainer.callbacks if isinstance(c, MaskPruningCallback) for o in c.score_optimizers]
            self.state = training_state(pl_module, [*trainer.optimizers, *scores])  # the scores' copy holds theirs


class TimedPruner(MaskPruningCallback):
    """The callback, with the time spent in its mask updates summed."""

    update_seconds = 0.0

    def _select(self, trainer, t, target) -> None:
        synchronize()
        start = now()
        try:
            return super()._select(trainer, t, target)
        finally:
            synchronize()
            self.update_seconds += now() - start


def training_state(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and buffers (each storage once), the masks' part of them,
    and the number of masked weights."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for tensor in tensors:
            if isinstance(tensor, Tensor) and tensor.numel():
                key = tensor.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
        return total

    states = {id(p): s for optimizer in optimizers for p, s in optimizer.state.items()}
    masked = masked_tensors(module)
    mask_tensors = [t for entry in masked for t in (entry.gate.scores, entry.gate.scores.grad,
                                                     *states.get(id(entry.gate.scores), {}).values(),
                                                     *entry.gate.buffers())]
    mask = size(mask_tensors)
    params = list(module.parameters())
    total = mask + size(params) + size(p.grad for p in params) + \
        size(v for p in params for v in states.get(id(p), {}).values()) + size(module.buffers())
    return {"total": total, "mask": mask, "masked_weights": sum(entry.numel for entry in masked)}


def fit_once(model: str, method: str, accelerator: str, precision: str, threads: int,
             steps: int | None = None) -> dict[str, Any]:
    """Train one model with one method (``steps``: instead of the model's own number); return its measurements
    (run in a child process)."""
    torch.set_num_threads(threads)
    CLOCK["now"] = time.thread_time if accelerator == "cpu" and threads == 1 else time.perf_counter
    pl.seed_everything(0, verbose=False)
    spec = MODELS[model]()
    spec.steps = steps or spec.steps
    generator = torch.Generator().manual_seed(0)
    data = spec.data(spec.batch * spec.steps, generator)
    loader = DataLoader(TensorDataset(*data), batch_size=spec.batch)
    task = Task(spec.build(), spec.loss)
    clock = Clock()
    callbacks: list[Callback] = [clock]
    pruner = None
    if method != "dense":
        pruner = TimedPruner(SPARSITY, **callback_arguments(dict(targets=spec.targets, plots=False, log_histograms=False,
                                                                 **OPTIONS[method])))
        callbacks.append(pruner)
    trainer = pl.Trainer(max_steps=spec.steps, accelerator=accelerator, devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, loader)
    steps = clock.steps
    ramp_end = int(round(2 / 3 * spec.steps))
    record = {"model": model, "method": method, "accelerator": accelerator, "precision": precision,
              "threads": threads, "batch": spec.batch, "steps": spec.steps,
              "parameters": sum(p.numel() for p in task.parameters()),
              "step_whole_s": statistics.fmean(steps[1:]), "step_after_ramp_s": statistics.median(steps[ramp_end:]),
              "train_s": sum(steps), **{f"state_{k}": v for k, v in clock.state.items()}}
    if accelerator == "gpu":
        record["peak_bytes"] = torch.cuda.max_memory_allocated()
    if pruner is not None:
        record.update(update_s=pruner.update_seconds, updates=len(pruner.plan.history["positions"]),
                      update_every=pruner.plan.every, base_every=pruner.plan.base_every)
    return record


def median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for the fits of a method: the median of each timing (and of the peak memory and update count),
    the rest from the first fit; ``rounds`` counts the fits."""
    record = dict(runs[0], rounds=len(runs))
    for key in ("step_whole_s", "step_after_ramp_s", "train_s", "update_s", "peak_rss_bytes", "peak_bytes", "updates"):
        if key in record:
            record[key] = statistics.median(run[key] for run in runs)
    if "update_s" in record:  # the update share's median, kept consistent with train_s
        share = statistics.median(run["update_s"] / run["train_s"] for run in runs)
        record["update_s"] = share * record["train_s"]
    return record


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` in a forked process; return its record with ``peak_rss_bytes`` (its peak RSS above its start)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        code = 0
        try:
            start = rss_bytes()
            record = fn()
            record["rss_start_bytes"] = start
            payload = pickle.dumps(record)
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            payload, code = pickle.dumps({"error": repr(error)}), 1
        with os.fdopen(write, "wb") as out:
            out.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as source:
        payload = source.read()
    _, status, usage = os.wait4(pid, 0)
    record = pickle.loads(payload)
    if "error" in record:
        raise RuntimeError(f"the fit failed in its process: {record['error']}")
    record["peak_rss_bytes"] = usage.ru_maxrss * 1024 - record["rss_start_bytes"]
    return record


# ------------------------------------------------------------------------------------------------ report
def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "—"


def repeated(records: list[dict[str, Any]]) -> str:
    fits = sorted({f"{r['model']} {r['rounds']}" for r in records if r.get("rounds", 1) > 1})
    return f" Fits of each method, interleaved, medians: {', '.join(fits)}." if fits else ""


def every(record: dict[str, Any]) -> str:
    """The interval the cadence ended with; "done" where the budget left no update after the ramp's end."""
    return "done" if record["update_every"] >= record["steps"] else str(record["update_every"])


def render(records: list[dict[str, Any]], accelerator: str, precision: str) -> str:
    by = {(r["model"], r["method"]): r for r in records}
    models = list(dict.fromkeys(r["model"] for r in records))
    peak = "peak_bytes" if accelerator == "gpu" else "peak_rss_bytes"
    mib = 2 ** 20
    rows = []
    for model in models:
        dense = by.get((model, "dense"))
        if dense is None:
            continue
        for method in METHODS:
            r = by.get((model, method))
            if r is None:
                continue
            masked = r.get("state_masked_weights", 0)
            rows.append([
                model if method == "dense" else "", method, f"{r['parameters'] / 1e6:.2f}M",
                f"{masked / 1e6:.2f}M" if masked else "—",
                f"{1e3 * r['step_whole_s']:.1f} ms", ratio(r["step_whole_s"], dense["step_whole_s"]),
                ratio(r["step_after_ramp_s"], dense["step_after_ramp_s"]),
                f"{r['state_total'] / mib:.1f} MiB", ratio(r["state_total"], dense["state_total"]),
                f"{r['state_mask'] / masked:.2f}" if masked else "—",
                f"{r[peak] / mib:.0f} MiB", ratio(r[peak], dense[peak]),
                f"{r['updates']:g} / {every(r)} ({r['base_every']})" if "updates" in r else "—",
                f"{100 * r['update_s'] / r['train_s']:.1f}%" if "updates" in r else "—",
            ])
    header = ["model", "method", "params", "masked", "step (whole fit)", "vs dense", "after ramp vs dense",
              "training state", "vs dense", "mask B/w", "peak " + ("CUDA" if accelerator == "gpu" else "RSS"),
              "vs dense", "updates / every (base)", "update time"]
    device = f"{accelerator}, {precision}" + (f", {records[0]['threads']} threads" if accelerator == "cpu" else "")
    return "\n".join([
        "# real_sizes", "",
        f"Lightning fits of random-init models on random data ({device}), sparsity {SPARSITY}, cubic ramp over the "
        "first two thirds; step times in " + ("CPU time of the fit's thread" if accelerator == "cpu" and
                                              records[0]["threads"] == 1 else "wall time") + "; `masks` are the defaults (update cadence from the fit's configuration), `masks_budget` "
        "with the opt-in update budget of 5% (measured timings), `masks_before` with float32 scores and a float32 "
        "scale per weight. Each fit in its own process, one at a "
        "time. Step: wall time per step (mask updates included), the whole fit's mean (first step left out) and "
        "the median after the ramp. Training state: parameters, gradients, optimizer state and buffers after the "
        "last step; `mask B/w`: the masks' part of it per masked weight. Peak: "
        + ("`torch.cuda.max_memory_allocated`." if accelerator == "gpu" else
           "the fit process's peak RSS above its RSS before the model was built.")
        + " Updates: how many ran, the interval the auto cadence ended with (`done`: no update left after the ramp; "
        "in brackets the configuration's interval), and their time as a share of the fit's step time. "
        + repeated(records), "",
        markdown_table(header, rows), ""])


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["model"], r["method"]): r for r in records}
    models = [m for m in dict.fromkeys(r["model"] for r in records) if (m, "dense") in by]
    metrics = [("step_whole_s", "step, whole fit"), ("step_after_ramp_s", "step, after ramp"),
               ("state_total", "training state")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), sharey=True)
    width = 0.38
    for axis, (key, title) in zip(axes, metrics):
        for offset, method in ((-width / 2, "masks_before"), (width / 2, "masks")):
            values = [by[(m, method)][key] / by[(m, "dense")][key] if (m, method) in by else 0 for m in models]
            axis.bar([i + offset for i in range(len(models))], values, width, label=method)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(models)), models, rotation=30)
        axis.set_title(title)
    axes[0].set_ylabel("x dense")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default=None, help="Lightning precision (default 32-true on CPU, bf16-mixed "
                                                          "on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each fit (1: steps timed in "
                                                                 "CPU time, else wall time)")
    parser.add_argument("--steps", type=int, default=None, help="steps of every fit (default: each model's own)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="fits of each method, interleaved, medians reported (default: each model's own)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="results stem (default real_sizes, real_sizes_gpu on a GPU)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other models' records of the results file, replacing those of --models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    name = args.name or ("real_sizes" if args.accelerator == "cpu" else "real_sizes_gpu")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    records = []
    for model in args.models:
        fits: dict[str, list[dict[str, Any]]] = {method: [] for method in args.methods}
        for index in range(args.rounds or MODELS[model]().rounds):
            for method in args.methods[index % len(args.methods):] + args.methods[:index % len(args.methods)]:
                record = in_child(lambda: fit_once(model, method, args.accelerator, precision, args.threads,
                                                   args.steps))
                fits[method].append(record)
                print(json.dumps({k: v for k, v in record.items() if not k.startswith("rss")}), flush=True)
        records += [median_record(runs) for runs in fits.values()]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.update and (args.out / f"{name}.json").exists():
        kept = [r for r in json.loads((args.out / f"{name}.json").read_text()) if r["model"] not in args.models]
        records = sorted(kept + records, key=lambda r: list(MODELS).index(r["model"]))
    (args.out / f"{name}.json").write_text(json.dumps(records, indent=1) + "\n")
    markdown = render(records, args.accelerator, precision)
    (args.out / f"{name}.md").write_text(markdown)
    plot(records, args.out / f"{name}.png")
    print(markdown)


if __name__ == "__main__":
    main()
