"""Where a masked training step's time goes on a CPU: memory traffic, page faults and the operators.

Three measurements on the batch-128 LeNet-300-100 step of ``overhead.py`` (90% sparse, one thread):

    passes     one elementwise product over the first layer's 300x784 weights, with its operands in cache and
               after a cache flush (a 64 MiB write), and the sigmoid the gate computes over as many scores
    faults     minor page faults a training step, per ``overhead.py`` method (``resource.getrusage``)
    operators  ``torch.profiler``'s self CPU time per step of the heaviest operators, dense (fused Adam) against
               masks, with the input shapes

Writes ``results/step_anatomy.md``.

Example:
    python benchmarks/step_anatomy.py            # about 15 seconds
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
from common import RESULTS, markdown_table

METHODS = ["dense", "dense (fused)", "masks", "masks, scores frozen", "masks, gate off"]


def median_us(fn: Callable[[], object], before: Callable[[], object], calls: int) -> float:
    """Median thread CPU time of ``fn`` in µs, ``before`` run (untimed) ahead of each call."""
    samples = []
    for _ in range(calls):
        before()
        began = time.thread_time_ns()
        fn()
        samples.append((time.thread_time_ns() - began) / 1e3)
    return statistics.median(samples)


def measure_passes(calls: int) -> list[list[str]]:
    weight, gate = torch.randn(300, 784), torch.rand(300, 784)
    flush_buffer = torch.zeros(16 * 2**20)
    ops = {"product `weight * gate`": lambda: weight * gate, "`torch.sigmoid(scores)`": lambda: torch.sigmoid(gate)}
    rows = []
    for name, op in ops.items():
        warm = median_us(op, lambda: None, calls)
        cold = median_us(op, lambda: flush_buffer.add_(1.0), calls)
        rows.append([name, f"{warm:.0f} µs", f"{cold:.0f} µs", f"{cold / warm:.1f}×"])
    return rows


def warmed_cases(methods: list[str], steps: int = 10) -> dict[str, overhead.Case]:
    """``overhead.py``'s batch-128 LeNet-300-100 cases, each trained ``steps`` steps (optimizer state made)."""
    cases = overhead.make_cases("lenet300", 128, methods)
    for case in cases.values():
        for _ in range(steps):
            case.train_step()
    return cases


def measure_faults(steps: int) -> list[list[str]]:
    rows = []
    for name, case in warmed_cases(METHODS).items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            case.train_step()
        rows.append([name, f"{(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps:.1f}"])
    return rows


def measure_operators(steps: int, top: int) -> dict[str, list[list[str]]]:
    tables = {}
    for name, case in warmed_cases(["dense (fused)", "masks"]).items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            for _ in range(steps):
                case.train_step()
        events = sorted(profiler.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / steps
        tables[name] = [[f"`{e.key}`", f"`{e.input_shapes}`"[:60], f"{e.count / steps:g}",
                         f"{e.self_cpu_time_total / steps:.0f} µs", f"{e.self_cpu_time_total / e.count:.0f} µs"]
                        for e in events[:top]] + [["all", "", "", f"{total:.0f} µs", ""]]
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="timed calls of each pass")
    parser.add_argument("--steps", type=int, default=100, help="training steps counted for faults")
    parser.add_argument("--profiled-steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="operators listed per method")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = ["# Anatomy of a masked training step (LeNet-300-100, batch 128, 90% sparse, CPU, one thread)\n",
            f"`python benchmarks/step_anatomy.py`; torch {torch.__version__}.\n",
            "## One weight-sized pass (300x784), median thread CPU time\n",
            markdown_table(["operation", "in cache", "cache flushed", "ratio"], measure_passes(args.calls)),
            f"\n## Minor page faults a training step (mean of {args.steps} steps)\n",
            markdown_table(["method", "faults a step"], measure_faults(args.steps))]
    for name, rows in measure_operators(args.profiled_steps, args.top).items():
        text += [f"\n## Heaviest operators a step: {name} (`torch.profiler`, self CPU time, its overhead included)\n",
                 markdown_table(["operator", "input shapes", "calls a step", "a step", "a call"], rows)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_anatomy.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
