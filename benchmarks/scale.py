"""Global selection at 10^8 and 10^9 scores: exact count, time and peak extra memory, against
``torch.nn.utils.prune.global_unstructured`` on the same tensors.

Each (method, size) runs in its own process so its peak resident memory is its own. Run by hand:

    python benchmarks/scale.py                     # 1e8 for both, 1e9 for lightning_masks
    python benchmarks/scale.py --sizes 1e8 1e9 --methods lightning_masks torch_prune

Writes ``benchmarks/results/scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TENSORS = 10
SPARSITY = 0.9


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class PeakMemory:
    """Sample this process's resident memory every few milliseconds; report the peak above the start."""

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = _rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _scores(size: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = size // TENSORS // 1000
    return [torch.rand(rows, 1000, generator=generator) for _ in range(TENSORS)]


def run_lightning_masks(size: int) -> dict:
    """Our global selection (gate importance) over the scores, as the callback runs it."""
    import torch

    from lightning_masks import MaskGate, Selector
    from lightning_masks.masking import MaskedTensor, pack_rows

    masked = []
    for index, scores in enumerate(_scores(size)):
        gate = MaskGate.__new__(MaskGate)  # wrap the scores without copying them
        torch.nn.Module.__init__(gate)
        gate.scores = torch.nn.Parameter(scores, requires_grad=False)
        gate.register_buffer("keep_bits", pack_rows(torch.ones_like(scores, dtype=torch.bool)))
        gate.register_buffer("temperature", torch.tensor(1.0))
        gate.register_buffer("gate_scale", None)
        gate._keep_cache = None
        masked.append(MaskedTensor(f"t{index}", gate, scores))
    count = round(SPARSITY * sum(e.numel for e in masked))
    with PeakMemory() as memory:
        start = time.perf_counter()
        pruned = Selector(importance="gate", layer_floor=0.0)(masked, SPARSITY).pruned
        seconds = time.perf_counter() - start
    achieved = sum(int((~e.gate.keep).sum()) for e in masked)
    return {"seconds": seconds, "extra_bytes": memory.extra, "target": count, "pruned": achieved,
            "exact": achieved == count == pruned}


def run_torch_prune(size: int) -> dict:
    """``prune.global_unstructured`` (L1) over the same tensors held as module weights."""
    import torch
    from torch.nn.utils import prune

    modules = []
    for scores in _scores(size):
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(scores, requires_grad=False)
        modules.append(module)
    count = round(SPARSITY * size)
    with PeakMemory() as memory:
        start = time.perf_counter()
        prune.global_unstructured([(m, "weight") for m in modules], prune.L1Unstructured, amount=count)
        seconds = time.perf_counter() - start
    achieved = sum(int((m.weight_mask == 0).sum()) for m in modules)
    return {"seconds": seconds, "extra_bytes": memory.extra, "target": count, "pruned": achieved,
            "exact": achieved == count}


METHODS = {"lightning_masks": run_lightning_masks, "torch_prune": run_torch_prune}


def measure(method: str, size: int, limit_gib: float) -> dict:
    """Run one (method, size) in a fresh process under an address-space limit (so running out of memory is a
    clean allocation error, not the kernel's OOM killer); a failure is recorded, not raised."""
    limit = int(limit_gib * 2**30)
    command = [sys.executable, __file__, "--one", method, str(size)]
    result = subprocess.run(command, capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    if result.returncode != 0:
        return {"method": method, "size": size, "error": (result.stderr.strip().splitlines() or ["killed"])[-1],
                "returncode": result.returncode}
    return {"method": method, "size": size, **json.loads(result.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    lines = ["| scores | method | exact count | time (s) | peak extra memory | scores' own size |",
             "|---:|---|---|---:|---:|---:|"]
    for row in rows:
        size = f"{row['size']:.0e}"
        own = f"{row['size'] * 4 / 2**30:.2f} GiB"
        if "error" in row:
            lines.append(f"| {size} | {row['method']} | failed: {row['error'][:60]} | | | {own} |")
        else:
            lines.append(f"| {size} | {row['method']} | {row['exact']} ({row['pruned']:,}) | {row['seconds']:.1f} "
                         f"| {row['extra_bytes'] / 2**30:.2f} GiB | {own} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e8, 1e9])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--limit-gib", type=float, default=14.0, help="address-space limit of each run")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(METHODS[args.one[0]](int(float(args.one[1])))))
        return
    rows = []
    for size in map(int, args.sizes):
        for method in args.methods:
            rows.append(measure(method, size, args.limit_gib))
            print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=1))
    note = (f"Global selection of {SPARSITY:.0%} of the scores, {TENSORS} tensors, one CPU thread, each run in "
            f"its own process limited to {args.limit_gib:g} GiB of address space; peak extra memory is resident "
            "memory above the start of the selection.\n\n")
    (RESULTS / "scale.md").write_text("# Selection at scale\n\n" + note + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
