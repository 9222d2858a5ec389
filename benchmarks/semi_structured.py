"""2:4 masks on the GPU: do our N:M masks turn into faster matmuls through PyTorch's semi-structured sparsity?

For each weight shape (out x in): an ``nn.Linear`` is masked with ``lightning_masks.attach`` (magnitude scores,
``rescale=True``), the keep-mask is set by ``Selector(granularity="2:4")`` (the callback's selection: in every
group of 4 consecutive weights of a row, the 2 most important kept), folded with ``lightning_masks.fold``, padded
with zeros to multiples of 64, cast to fp16 and converted with ``torch.sparse.to_sparse_semi_structured``. The
sparse layer's output is checked against the dense folded layer's (``F.linear``, same fp16 weights), and both are
timed with CUDA events (median of 10 rounds of 50 calls, after warm-up) at batch 64 and 1024 (and 8192 for the
large shapes), through both of PyTorch's 2:4 backends (cuSPARSELt and CUTLASS). Shapes: 4096x4096,
the LLaMA-7B MLP's 11008x4096 and 4096x11008, and LeNet-300-100's three layers (300x784 -> 320x832, 100x300 ->
128x320, 10x100 -> 64x128 after padding).

Needs a CUDA GPU of compute capability 8.0 or newer (A100, H100); elsewhere it exits with a message and writes
nothing. Run: ``python benchmarks/semi_structured.py`` (well under a minute on an H100).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_masks import Selector, attach, fold

RESULTS = Path(__file__).resolve().parent / "results"
#: name -> (out_features, in_features) of the Linear weight.
SHAPES = {
    "square 4096x4096": (4096, 4096),
    "LLaMA-7B MLP up 11008x4096": (11008, 4096),
    "LLaMA-7B MLP down 4096x11008": (4096, 11008),
    "LeNet-300-100 fc1 300x784": (300, 784),
    "LeNet-300-100 fc2 100x300": (100, 300),
    "LeNet-300-100 fc3 10x100": (10, 100),
}
BATCHES = (64, 1024)
LARGE_BATCH = 8192  # also timed for the LLaMA-sized shapes, where the matmul is compute-bound
PAD = 64
BACKENDS = ("cusparselt", "cutlass")


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; 2:4 sparse kernels need 8.0+"
    return None


def round_up(value: int, multiple: int = PAD) -> int:
    return -(-value // multiple) * multiple


def folded_2_4_layer(out_features: int, in_features: int, seed: int) -> nn.Linear:
    """A Linear whose weight carries a 2:4 mask chosen by our Selector, folded to exact zeros (fp32, CPU)."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    model = nn.Sequential(layer)
    masked = attach(model, init=torch.abs, rescale=True)
    selector = Selector(granularity="2:4")
    selector.check(masked)
    selector(masked, 0.5)
    fold(model)
    return layer


def padded(layer: nn.Linear, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's fp16 weight and bias, zero-padded to multiples of ``PAD``."""
    out_features, in_features = layer.weight.shape
    weight = torch.zeros(round_up(out_features), round_up(in_features), dtype=torch.float16, device=device)
    weight[:out_features, :in_features] = layer.weight.detach().half()
    bias = torch.zeros(len(weight), dtype=torch.float16, device=device)
    bias[:out_features] = layer.bias.detach().half()
    return weight, bias


def time_ms(call, rounds: int = 10, calls: int = 50) -> float:
    """Median milliseconds per ``call()``, from CUDA events around ``calls`` calls, over ``rounds`` rounds."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``to_sparse_semi_structured`` through one backend: ``cusparselt`` or ``cutlass``."""
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    return torch.sparse.to_sparse_semi_structured(weight)


@torch.no_grad()
def measure(name: str, shape: tuple[int, int], seed: int, device: torch.device, backend: str) -> list[dict]:
    layer = folded_2_4_layer(*shape, seed)
    weight, bias = padded(layer, device)
    groups = weight.reshape(-1, 4).ne(0).sum(1)
    assert int(groups.max()) <= 2, f"{name}: a group of 4 holds {int(groups.max())} nonzeros"
    sparse = to_semi_structured(weight, backend)
    rows = []
    for batch in BATCHES + ((LARGE_BATCH,) if min(shape) >= 4096 else ()):
        x = torch.zeros(batch, weight.shape[1], dtype=torch.float16, device=device)
        x[:, : shape[1]] = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(seed)).half()
        dense_out, sparse_out = F.linear(x, weight, bias), F.linear(x, sparse, bias)
        error = float((sparse_out - dense_out).float().abs().max() / dense_out.float().abs().max())
        reference = x[:, : shape[1]].float() @ layer.weight.detach().to(device).T + layer.bias.detach().to(device)
        error_fp32 = float((sparse_out[:, : shape[0]].float() - reference).abs().max() / reference.abs().max())
        dense_ms = time_ms(lambda: F.linear(x, weight, bias))
        sparse_ms = time_ms(lambda: F.linear(x, sparse, bias))
        rows.append({"layer": name, "shape": list(shape), "padded": list(weight.shape), "batch": batch,
                     "backend": type(sparse).__name__, "rel_error_vs_dense_fp16": error,
                     "rel_error_vs_fp32_folded": error_fp32, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                     "speedup": dense_ms / sparse_ms})
        print(f"{name} {backend} batch {batch}: dense {dense_ms:.4f} ms, 2:4 {sparse_ms:.4f} ms "
              f"({dense_ms / sparse_ms:.2f}x), relative error {error:.1e}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| layer (out x in) | padded | backend | batch | dense fp16 ms | 2:4 ms | speedup | max rel. error vs "
             "dense fp16 | vs fp32 folded |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['padded'][0]}x{r['padded'][1]} | {r['backend']} | {r['batch']} | {r['dense_ms']:.4f} | "
              f"{r['sparse_ms']:.4f} | {r['speedup']:.2f}x | {r['rel_error_vs_dense_fp16']:.1e} | "
              f"{r['rel_error_vs_fp32_folded']:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated: cusparselt (PyTorch's default where built with it), cutlass")
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help="largest relative difference allowed between the 2:4 and the dense fp16 outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="semi_structured", help="results/<OUTPUT>.md and .json are written")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backends {args.backends!r}: pick from {BACKENDS}")
    reason = no_gpu_reason()
    if reason:
        raise SystemExit(f"benchmarks/semi_structured.py needs a CUDA GPU with 2:4 sparse tensor cores (compute "
                         f"capability 8.0+, e.g. A100 or H100): {reason}. Nothing was written; run it on such a GPU.")
    start = time.perf_counter()
    device = torch.device("cuda")
    rows, failures = [], {}
    for backend in backends:
        try:
            rows += [row for name, shape in SHAPES.items() for row in measure(name, shape, args.seed, device, backend)]
        except (RuntimeError, NotImplementedError) as error:  # e.g. a backend not built for this GPU
            failures[backend] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            print(f"{backend} failed: {failures[backend]}", flush=True)
    if not rows:
        sys.exit(f"no 2:4 backend ran on this GPU: {failures}")
    worst = max(row["rel_error_vs_dense_fp16"] for row in rows)
    note = (f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"seed {args.seed}. Largest relative difference from the dense fp16 layer: {worst:.1e} (tolerance "
            f"{args.tolerance:g}). Wall time {time.perf_counter() - start:.0f} s."
            + "".join(f" Backend {b} did not run: {why}." for b, why in failures.items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"settings": note, "rows": rows, "failures": failures},
                                                            indent=1))
    text = f"# 2:4 masks as semi-structured sparse matmuls\n\n{__doc__.split(chr(10), 2)[2]}\n{note}\n\n{table(rows)}\n"
    (RESULTS / f"{args.output}.md").write_text(text)
    print(text)
    if worst > args.tolerance:
        sys.exit(f"the 2:4 outputs differ from the dense ones by {worst:.1e} > {args.tolerance:g}")


if __name__ == "__main__":
    main()
