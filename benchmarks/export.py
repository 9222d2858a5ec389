"""What export buys: parameters, FLOPs, file size and CPU latency of shrunk LeNet-5 and ResNet-20, and the
sparse file size of element-pruned ones.

Channel masks are simulated (the callback's ``channel`` granularity was not in when this was written): in every
Conv/Linear but the output layer the lowest-L1 share of output channels is zeroed, and so are the affine terms
of a BatchNorm that follows (what a channel mask covering the BN does). Models are freshly initialised: the
numbers are about size and speed, not accuracy. FLOPs are counted by ``torch.utils.flop_counter`` (a
multiply-add is 2). Latency: eager forward, ``torch.set_num_threads(1)``, dense and shrunk models timed in
interleaved rounds (median, ~3 s each) on a shared 2-core CPU: batch-1 figures are noisy. Run: ``python benchmarks/export.py`` (about 1 minute).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_masks.export import save_sparse, shrink
from lightning_masks.zoo import LeNet5, ResNet20

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"lenet5": (lambda: LeNet5(), (1, 28, 28)), "resnet20": (lambda: ResNet20(), (3, 32, 32))}
CHANNEL_SPARSITIES = (0.5, 0.75, 0.9)
ELEMENT_SPARSITIES = (0.9, 0.95, 0.99)


def layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """Each Conv/Linear but the last, with the BatchNorm right after it in module order (or None)."""
    modules = list(model.modules())
    found = [(m, modules[i + 1] if i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d) else None)
             for i, m in enumerate(modules) if isinstance(m, (nn.Conv2d, nn.Linear))]
    return found[:-1]


@torch.no_grad()
def zero_channels(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the lowest-L1 ``sparsity`` share of output channels of every layer (and their BN affine terms)."""
    for layer, norm in layers(model):
        channels = layer.weight.flatten(1).abs().sum(1).argsort()[: int(sparsity * layer.weight.shape[0])]
        layer.weight[channels] = 0
        if norm is not None:
            norm.weight[channels], norm.bias[channels] = 0, 0
    return model


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
def latencies_ms(models: list[nn.Module], x: torch.Tensor, budget_s: float) -> list[float]:
    """Median forward time of each model, timed in interleaved rounds (so load changes hit all alike)."""
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model(x)
    start = time.perf_counter()
    while len(times[0]) < 5 or (time.perf_counter() - start < budget_s * len(models) and len(times[0]) < 200):
        for model, own in zip(models, times):
            tick = time.perf_counter()
            model(x)
            own.append(time.perf_counter() - tick)
    return [1000 * statistics.median(own) for own in times]


def channel_rows(name: str, budget_s: float) -> list[dict]:
    """Dense and shrunk models at each channel sparsity: size, FLOPs and latency (batch 1 and 64)."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    models, rows = [build().eval()], [{"model": name, "sparsity": 0.0, "removed": 0, "skipped_layers": 0}]
    for sparsity in CHANNEL_SPARSITIES:
        torch.manual_seed(0)
        small, report = shrink(zero_channels(build().eval(), sparsity), torch.randn(8, *shape))
        models.append(small)
        rows.append({"model": name, "sparsity": sparsity, "removed": sum(report.removed.values()),
                     "skipped_layers": len(report.skipped)})
    for batch in (1, 64):
        for row, ms in zip(rows, latencies_ms(models, torch.randn(batch, *shape), budget_s)):
            row[f"ms_b{batch}"] = ms
    for row, model in zip(rows, models):
        row.update(params=sum(p.numel() for p in model.parameters()), flops=flops(model, torch.randn(1, *shape)),
                   file_bytes=file_bytes(model))
    return rows


def element_rows(name: str) -> list[dict]:
    build, _ = MODELS[name]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for sparsity in ELEMENT_SPARSITIES:
            torch.manual_seed(0)
            info = save_sparse(zero_elements(build(), sparsity), Path(folder) / "m.safetensors")
            rows.append({"model": name, "sparsity": sparsity, "dense_bytes": info.dense_bytes,
                         "sparse_bytes": info.sparse_bytes, "ratio": info.ratio})
    return rows


def channel_table(rows: list[dict]) -> str:
    lines = ["| model | channels pruned | params | FLOPs (batch 1) | file | ms batch 1 | ms batch 64 | "
             "params / dense | FLOPs / dense | latency b1 / dense | latency b64 / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["sparsity"] == 0)
        lines.append(f"| {row['model']} | {row['sparsity']:.0%} | {row['params']:,} | {row['flops']:,} | "
                     f"{row['file_bytes'] / 1024:.0f} KiB | {row['ms_b1']:.2f} | {row['ms_b64']:.1f} | "
                     f"{row['params'] / base['params']:.3f} | {row['flops'] / base['flops']:.3f} | "
                     f"{row['ms_b1'] / base['ms_b1']:.2f} | {row['ms_b64'] / base['ms_b64']:.2f} |")
    return "\n".join(lines)


def element_table(rows: list[dict]) -> str:
    lines = ["| model | weights pruned | dense file | sparse file | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sparsity']:.0%} | {r['dense_bytes'] / 1024:.0f} KiB | "
              f"{r['sparse_bytes'] / 1024:.0f} KiB | {r['ratio']:.3f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        base, x = mine[0], [r["sparsity"] for r in mine]
        axes[0].plot(x, [r["params"] / base["params"] for r in mine], "o-", label=f"{name} params")
        axes[0].plot(x, [r["flops"] / base["flops"] for r in mine], "s--", label=f"{name} FLOPs")
        for batch, style in (("b1", "o-"), ("b64", "s--")):
            axes[1].plot(x, [r[f"ms_{batch}"] / base[f"ms_{batch}"] for r in mine], style, label=f"{name} {batch}")
    for axis, title in zip(axes, ("size after shrink / dense", "CPU latency / dense (1 thread)")):
        axis.set(xlabel="share of output channels pruned", title=title, ylim=(0, 1.1))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per latency figure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    channels = [row for name in MODELS for row in channel_rows(name, args.budget)]
    elements = [row for name in MODELS for row in element_rows(name)]
    (RESULTS / "export.json").write_text(json.dumps({"channel": channels, "element": elements}, indent=1))
    plot(channels, RESULTS / "export.png")
    text = (f"# Export: shrink and sparse save\n\n{__doc__.split(chr(10), 2)[2]}\n"
            f"## Channel pruning, then `shrink`\n\n{channel_table(channels)}\n\n"
            f"## Element pruning, then `save_sparse`\n\n{element_table(elements)}\n")
    (RESULTS / "export.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
