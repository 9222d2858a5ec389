"""What export buys, beside the accuracy it costs: Fashion-MNIST test accuracy, parameters, FLOPs, file size
and CPU latency of LeNet-5 and ResNet-20 trained with channel masks and shrunk, and the sparse file size of
element-pruned ones.

Channel rows (``--train``, the default): each model is trained on Fashion-MNIST (Adam 1e-3, the same epochs for
all) dense, and with ``MaskPruningCallback(s, selector=Selector(granularity="channel", mode="layer"))`` for each ``s``,
masks left unfolded. Reported: test accuracy of the dense model, of the masked model, of the folded one
(``lightning_masks.fold``) and of the shrunk one (``shrink`` of the folded ``net``; its logits must match the
folded model's, the largest difference is listed). What is masked:

- ``lenet5``: every Conv/Linear but the output layer.
- ``resnet20`` (``in_channels=1``, 28x28 input, option-A ``"pad"`` shortcuts): the first BatchNorm of each residual
  block, so a pruned channel's scale and shift are both zero and ``shrink`` removes it with the conv before and
  the input channels of the conv after. (Masking the convs themselves would leave each pruned channel at the
  BatchNorm's shift, a constant that the next zero-padded conv reads, which cannot be removed exactly.) The
  residual streams stay whole: every block of a stage adds into them, and the pad shortcut carries a stage's
  channels into the next one by position.
- ``resnet20_streams`` (``ResNet20(shortcut="projection")``, option-B 1x1 conv-BN shortcuts): the same, plus the
  BatchNorms that write each stage's residual stream (the stem's or the shortcut's, and each block's second),
  tied per stage (``tie=coupled_channels(module, example)``): one keep per stream channel, so a pruned stream channel is
  zero in every block and ``shrink`` removes it everywhere.

With ``--no-train`` the masks are simulated on untrained models: the lowest mean-``|w|`` channels of the same
layers (tied groups by their sum) are pruned as the callback's first selection would, then folded.

FLOPs are counted by ``torch.utils.flop_counter`` (a multiply-add is 2). Latency: eager forward on the CPU,
``torch.set_num_threads(1)``, dense and shrunk models timed in interleaved rounds (median); batch-1 figures
are noisy on a shared CPU. Element rows: untrained models, smallest-magnitude weights zeroed, ``save_sparse``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_masks import MaskLogging, MaskPruningCallback, Schedule, Selector, attach, fold
from lightning_masks.export import save_sparse
from lightning_masks.export.shrink import shrink
from lightning_masks.selection import coupled_channels
from lightning_masks.zoo.data import FASHION_MNIST_ROOT, FashionMNISTDataModule
from lightning_masks.zoo.models import LeNet5, ResNet20

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Spec:
    """A benchmarked model: its LightningModule, input shape, and what its channel masks cover (the
    ``targets``/``exclude``/``tie`` options of ``MaskPruningCallback``, from the built module)."""

    build: Callable[[], pl.LightningModule]
    shape: tuple[int, ...]
    masks: Callable[[pl.LightningModule], dict]


def _streams(module: ResNet20) -> dict:
    streams = coupled_channels(module, torch.randn(2, 1, 28, 28))
    return {"targets": ["net.*.body.1.weight", *(name for stream in streams for name in stream)], "tie": streams}


MODELS = {
    "lenet5": Spec(lambda: LeNet5(), (1, 28, 28), lambda module: {"exclude": ["net.11"]}),
    "resnet20": Spec(lambda: ResNet20(in_channels=1), (1, 28, 28), lambda module: {"targets": ["net.*.body.1.weight"]}),
    "resnet20_streams": Spec(lambda: ResNet20(in_channels=1, shortcut="projection"), (1, 28, 28), _streams),
}
CHANNEL_SPARSITIES = (0.5, 0.75, 0.9)
ELEMENT_SPARSITIES = (0.9, 0.95, 0.99)


def simulated_masks(module: pl.LightningModule, spec: Spec, sparsity: float) -> nn.Module:
    """Prune ``sparsity`` of the masked channels of an untrained model by mean ``|w|`` (tied groups by their sum),
    as the callback's first selection would, and return its folded ``net``."""
    masks = spec.masks(module)
    masked = attach(module, masks.get("targets"), masks.get("exclude", ()), per_channel=True)
    Selector(mode="layer", granularity="channel", tie=masks.get("tie", ()))(masked, sparsity)
    return fold(module).net.eval()


@torch.no_grad()
def zero_elements(model: nn.Module, sparsity: float) -> dict:
    """Zero the smallest-magnitude ``sparsity`` share of every Conv/Linear weight; return the state dict."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight
            weight[weight.abs() <= weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values] = 0
    return model.state_dict()


def file_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@torch.no_grad()
def latencies_ms(models: list[nn.Module], x: torch.Tensor, budget_s: float,
                 clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median forward time of each model, timed in interleaved rounds (so load changes hit all alike). The
    forward runs on one thread, so ``time.thread_time`` gives its time on a core of its own even when other
    processes share the cores (the wall clock then adds their time slices)."""
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model(x)
    start = time.perf_counter()
    while len(times[0]) < 5 or (time.perf_counter() - start < budget_s * len(models) and len(times[0]) < 200):
        for model, own in zip(models, times):
            tick = clock()
            model(x)
            own.append(clock() - tick)
    return [1000 * statistics.median(own) for own in times]


@torch.no_grad()
def logits(net: nn.Module, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The eval-mode logits of ``net`` on ``inputs`` (on ``device``, batches of 1000), on the CPU."""
    net.eval().to(device)
    return torch.cat([net(batch.to(device)).float().cpu() for batch in inputs.split(1000)])


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return float((scores.argmax(1) == targets).float().mean())


def train(name: str, sparsity: float | None, data: FashionMNISTDataModule, args: argparse.Namespace) -> pl.LightningModule:
    """Train one model for ``args.epochs`` epochs, dense (``sparsity=None``) or with channel masks left unfolded."""
    spec = MODELS[name]
    pl.seed_everything(args.seed, verbose=False)
    module = spec.build()
    callbacks = []
    if sparsity is not None:
        batches = args.limit_train_batches or len(data.train_set) // data.batch_size + 1
        steps = int(batches if batches > 1 else batches * (len(data.train_set) // data.batch_size + 1)) * args.epochs
        masks = spec.masks(module)
        selector = Selector(granularity="channel", mode="layer", tie=masks.pop("tie", ()))
        callbacks.append(MaskPruningCallback(sparsity, selector=selector, **masks,
                                             schedule=Schedule(update_every=max(1, steps // 30)), fold_on_fit_end=False,
                                             seed=args.seed, logging=MaskLogging(histograms=False, plots=False)))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=args.limit_train_batches, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return module


def trained_models(name: str, data: FashionMNISTDataModule, args: argparse.Namespace, device: torch.device):
    """Yield ``(row, plain net)`` for the dense model and each shrunk one, with the accuracies filled in."""
    inputs, targets = data.test_set.tensors
    example = inputs[:16]
    dense = train(name, None, data, args).net
    dense_acc = accuracy(logits(dense, inputs, device), targets)
    yield {"model": name, "sparsity": 0.0, "acc_dense": dense_acc, "acc_masked": dense_acc, "acc_folded": dense_acc,
           "acc_shrunk": dense_acc, "max_logit_diff": 0.0, "removed": 0, "skipped_layers": 0}, dense.cpu()
    for sparsity in args.sparsities:
        start = time.perf_counter()
        net = train(name, sparsity, data, args).net
        masked = logits(net, inputs, device)
        folded = logits(fold(net), inputs, device)
        small, report = shrink(net.cpu(), example)
        shrunk = logits(small, inputs, device)
        row = {"model": name, "sparsity": sparsity, "acc_dense": dense_acc, "acc_masked": accuracy(masked, targets),
               "acc_folded": accuracy(folded, targets), "acc_shrunk": accuracy(shrunk, targets),
               "max_logit_diff": float((shrunk - folded).abs().max()), "removed": sum(report.removed.values()),
               "skipped_layers": len(report.skipped), "train_s": time.perf_counter() - start}
        print(f"{name} {sparsity:.0%}: accuracy masked {row['acc_masked']:.4f} folded {row['acc_folded']:.4f} "
              f"shrunk {row['acc_shrunk']:.4f} (dense {dense_acc:.4f}); {row['removed']} channels removed", flush=True)
        yield row, small.cpu()


def simulated_models(name: str, args: argparse.Namespace):
    """Yield ``(row, plain net)`` for an untrained dense model and shrunk ones with simulated channel masks."""
    spec = MODELS[name]
    torch.manual_seed(args.seed)
    yield {"model": name, "sparsity": 0.0, "removed": 0, "skipped_layers": 0}, spec.build().net.eval()
    for sparsity in args.sparsities:
        torch.manual_seed(args.seed)
        small, report = shrink(simulated_masks(spec.build(), spec, sparsity), torch.randn(16, *spec.shape))
        yield {"model": name, "sparsity": sparsity, "removed": sum(report.removed.values()),
               "skipped_layers": len(report.skipped)}, small


def channel_rows(name: str, args: argparse.Namespace, data, device) -> list[dict]:
    """Dense and shrunk models at each channel sparsity: accuracy, size, FLOPs and latency (batch 1 and 64)."""
    shape = MODELS[name].shape
    pairs = list(trained_models(name, data, args, device) if args.train else simulated_models(name, args))
    rows, models = [row for row, _ in pairs], [model.cpu().eval() for _, model in pairs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in (1, 64):
            clock = time.thread_time if args.clock == "thread" else time.perf_counter
            for row, ms in zip(rows, latencies_ms(models, torch.randn(batch, *shape), args.budget, clock)):
                row[f"ms_b{batch}"] = ms
    finally:
        torch.set_num_threads(threads)
    for row, model in zip(rows, models):
        row.update(params=sum(p.numel() for p in model.parameters()), flops=flops(model, torch.randn(1, *shape)),
                   file_bytes=file_bytes(model))
    return rows


def element_rows(name: str) -> list[dict]:
    build = MODELS[name].build
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for sparsity in ELEMENT_SPARSITIES:
            torch.manual_seed(0)
            info = save_sparse(zero_elements(build().net, sparsity), Path(folder) / "m.safetensors")
            rows.append({"model": name, "sparsity": sparsity, "dense_bytes": info.dense_bytes,
                         "sparse_bytes": info.sparse_bytes, "ratio": info.ratio})
    return rows


def channel_table(rows: list[dict]) -> str:
    trained = "acc_dense" in rows[0]
    accuracy_head = "test acc dense / masked / folded / shrunk | max logit diff | " if trained else ""
    lines = [f"| model | channels pruned | {accuracy_head}params | FLOPs (batch 1) | file | ms batch 1 | ms batch 64 | "
             "params / dense | FLOPs / dense | latency b1 / dense | latency b64 / dense |",
             "|---|---|" + "---|---|" * trained + "---|" * 9]
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["sparsity"] == 0)
        accuracy_cells = (f"{row['acc_dense']:.4f} / {row['acc_masked']:.4f} / {row['acc_folded']:.4f} / "
                          f"{row['acc_shrunk']:.4f} | {row['max_logit_diff']:.1e} | ") if trained else ""
        lines.append(f"| {row['model']} | {row['sparsity']:.0%} | {accuracy_cells}{row['params']:,} | "
                     f"{row['flops']:,} | {row['file_bytes'] / 1024:.0f} KiB | {row['ms_b1']:.2f} | "
                     f"{row['ms_b64']:.1f} | {row['params'] / base['params']:.3f} | {row['flops'] / base['flops']:.3f} | "
                     f"{row['ms_b1'] / base['ms_b1']:.2f} | {row['ms_b64'] / base['ms_b64']:.2f} |")
    return "\n".join(lines)


def element_table(rows: list[dict]) -> str:
    lines = ["| model | weights pruned | dense file | sparse file | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sparsity']:.0%} | {r['dense_bytes'] / 1024:.0f} KiB | "
              f"{r['sparse_bytes'] / 1024:.0f} KiB | {r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    trained = "acc_dense" in rows[0]
    figure, axes = plt.subplots(1, 2 + trained, figsize=(16 if trained else 11, 4))
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        base, x = mine[0], [r["sparsity"] for r in mine]
        axes[0].plot(x, [r["params"] / base["params"] for r in mine], "o-", label=f"{name} params")
        axes[0].plot(x, [r["flops"] / base["flops"] for r in mine], "s--", label=f"{name} FLOPs")
        for batch, style in (("b1", "o-"), ("b64", "s--")):
            axes[1].plot(x, [r[f"ms_{batch}"] / base[f"ms_{batch}"] for r in mine], style, label=f"{name} {batch}")
        if trained:
            axes[2].plot(x, [r["acc_shrunk"] for r in mine], "o-", label=f"{name} shrunk")
            axes[2].axhline(base["acc_dense"], linestyle=":", color=axes[2].lines[-1].get_color(),
                            label=f"{name} dense")
    titles = ("size after shrink / dense", "CPU latency / dense (1 thread)", "Fashion-MNIST test accuracy")
    for axis, title in zip(axes, titles):
        axis.set(xlabel="share of output channels pruned", title=title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylim(0, 1.1)
    axes[1].set_ylim(0, 1.1)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def settings(args: argparse.Namespace, device: torch.device) -> str:
    """One paragraph saying where and how these figures were made."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    clock = "wall clock" if args.clock == "wall" else "thread CPU time"
    if not args.train:
        return (f"Settings: untrained models, simulated masks (`--no-train`), seed {args.seed}, torch "
                f"{torch.__version__}; latency in {clock}.")
    limit = f", `--limit-train-batches {args.limit_train_batches}`" if args.limit_train_batches else ""
    return (f"Settings: `--epochs {args.epochs} --batch-size {args.batch_size}`{limit}, trained on {where} "
            f"(`--accelerator {args.accelerator}`), seed {args.seed}, torch {torch.__version__}, lightning "
            f"{pl.__version__}; latency on this machine's CPU in {clock} ({args.budget:g} s of timing per figure).")


def positive_fraction_or_count(text: str) -> float | int:
    value = float(text)
    if value <= 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r}: give a fraction in (0, 1] or a whole number of batches")
    return int(value) if value > 1 else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="train on Fashion-MNIST and report accuracy (default); --no-train: untrained models")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of every model (dense and masked)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--limit-train-batches", type=positive_fraction_or_count, default=None,
                        help="batches (or fraction) per training epoch, for a quick run")
    parser.add_argument("--accelerator", "--device", default="auto", help="Lightning accelerator: cpu, gpu, auto")
    parser.add_argument("--devices", type=int, default=1, help="number of devices (training is single-device)")
    parser.add_argument("--data-root", default=FASHION_MNIST_ROOT, help="folder of the four Fashion-MNIST IDX files")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {sorted(MODELS)}")
    parser.add_argument("--sparsities", default=",".join(map(str, CHANNEL_SPARSITIES)),
                        help="comma-separated channel sparsities")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per latency figure")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="latency clock: wall time, or this thread's CPU time (for a CPU shared with others)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="export", help="results/<OUTPUT>.md, .json and .png are written")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {sorted(MODELS)}")
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    data, device = None, torch.device("cpu")
    if args.train:
        data = FashionMNISTDataModule(args.data_root, batch_size=args.batch_size, seed=args.seed)
        data.setup()
        accelerator = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False).accelerator
        device = torch.device("cuda") if type(accelerator).__name__ == "CUDAAccelerator" else device
        if device.type == "cuda":  # full fp32, so the shrunk model's logits can be compared with the folded one's
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    RESULTS.mkdir(exist_ok=True)
    channels = [row for name in args.models for row in channel_rows(name, args, data, device)]
    elements = [row for name in args.models for row in element_rows(name)]
    note = settings(args, device)
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"settings": note, "channel": channels,
                                                             "element": elements}, indent=1))
    plot(channels, RESULTS / f"{args.output}.png")
    text = (f"# Export: shrink and sparse save\n\n{__doc__.split(chr(10) * 2, 1)[1]}\n{note} "
            f"Wall time {time.perf_counter() - start:.0f} s. Run: `python benchmarks/export.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
            f"## Channel pruning, then `shrink`\n\n{channel_table(channels)}\n\n"
            f"## Element pruning, then `save_sparse`\n\n{element_table(elements)}\n")
    (RESULTS / f"{args.output}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
