"""What one mask update costs against a training step, at the sizes of ``real_sizes.py``: the ground of the auto cadence.

``update_every="auto"`` plans for an update costing ``plan.UPDATE_COST_STEPS`` training steps on a single example
(a step on a batch costs more). This measures, for each model of ``real_sizes.py`` with the default masks (bfloat16
scores, one scale a tensor, packed keep bits) and AdamW in a plain loop, with one torch thread and this thread's CPU
time: the median of 5 training steps on the model's batch and on a batch of one, and the median of 7 updates of the
default ``Selector`` re-selecting at rising targets (0.1, 0.2, ... 0.7).

Writes ``results/update_cost.json`` and ``update_cost.md``.

Example:
    python benchmarks/update_cost.py                       # every model, ~3 min of CPU
    python benchmarks/update_cost.py --models lenet300 bert
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table
from real_sizes import MODELS

from lightning_masks import Selector, attach
from lightning_masks.lifecycle import UPDATE_COST_STEPS


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def measure(name: str) -> dict:
    """The step (model's batch and one example) and update times of one model, in seconds."""
    spec = MODELS[name]()
    torch.manual_seed(0)
    model = spec.build()
    masked = attach(model, spec.targets, score_dtype=torch.bfloat16, compact=True, rescale=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step(batch: int) -> None:
        data = spec.data(batch, generator)
        optimizer.zero_grad()
        spec.loss(model, data).backward()
        optimizer.step()

    step(spec.batch)  # one-off costs
    batch_step, one_step = median_seconds(lambda: step(spec.batch), 5), median_seconds(lambda: step(1), 5)
    select, targets = Selector(), iter([0.1 * i for i in range(1, 8)])
    select(masked, 0.05)
    update = median_seconds(lambda: select(masked, next(targets)), 7)
    return {"model": name, "tensors": len(masked), "units": sum(entry.units for entry in masked),
            "batch": spec.batch, "step_batch_s": batch_step, "step_one_s": one_step, "update_s": update}


def render(records: list[dict]) -> str:
    rows = [[r["model"], str(r["tensors"]), f"{r['units'] / 1e6:.2f}M", f"{1e3 * r['update_s']:.2f} ms",
             f"{1e3 * r['step_one_s']:.2f} ms", f"{r['update_s'] / r['step_one_s']:.2f}",
             f"{1e3 * r['step_batch_s']:.2f} ms ({r['batch']})", f"{r['update_s'] / r['step_batch_s']:.2f}"]
            for r in records]
    header = ["model", "masked tensors", "masked units", "update", "step, one example", "update / that step",
              "step, its batch", "update / that step"]
    return "\n".join([
        "# update_cost", "",
        "One mask update (the default Selector re-selecting at a rising target) against a training step (AdamW, plain "
        "loop) on one example and on the model's batch, with the default masks; CPU time of one torch thread, "
        "medians. The auto cadence counts an update as "
        f"{UPDATE_COST_STEPS:g} step on one example (`plan.UPDATE_COST_STEPS`).", "",
        markdown_table(header, rows), ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    records = []
    for name in args.models:
        records.append(measure(name))
        print(json.dumps(records[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "update_cost.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "update_cost.md").write_text(render(records))
    print(render(records))


if __name__ == "__main__":
    main()
