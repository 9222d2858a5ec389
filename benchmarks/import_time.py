"""How long ``import lightning_masks`` takes, and what it imports, for source trees side by side.

Each round imports the package once from every tree, in a fresh interpreter (interleaved, so the machine's noise hits
all trees alike): the wall time of ``python -c "import lightning_masks"`` less that of ``python -c "pass"``, whether
``matplotlib.pyplot`` or ``torch_pruning`` got imported (Lightning's torchmetrics imports pyplot itself), and
whether the plotting backend a user chose (``MPLBACKEND=svg`` here) is still the one in use after the import.

    git worktree add --detach ../before c15dd53^   # the tree before the lazy imports (issue 15, item 7)
    python benchmarks/import_time.py ../before . --labels before after --rounds 15 --name import_time
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

USER_BACKEND = "svg"
PROBE = ("import sys; import lightning_masks; "
         "print(sorted(m for m in ('matplotlib.pyplot', 'torch_pruning') if m in sys.modules)); "
         "import matplotlib; print('backend', matplotlib.get_backend())")


def _seconds(tree: Path | None, code: str) -> tuple[float, str]:
    env = dict(os.environ, MPLBACKEND=USER_BACKEND)  # the user's choice of backend
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree or ".", capture_output=True, text=True,
                         check=True).stdout
    return time.perf_counter() - started, out.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (each holds lightning_masks/)")
    parser.add_argument("--labels", nargs="+", help="a name per tree for the table (default: the paths)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="import_time")
    args = parser.parse_args(argv)
    labels = args.labels or [str(tree) for tree in args.trees]
    if len(labels) != len(args.trees):
        parser.error(f"--labels gives {len(labels)} names for {len(args.trees)} trees")
    times: dict[str, list[float]] = {label: [] for label in labels}
    seen: dict[str, str] = {}
    for _ in range(args.rounds):
        for label, tree in zip(labels, args.trees):
            base, _ = _seconds(None, "pass")
            took, out = _seconds(tree.resolve(), PROBE)
            times[label].append(took - base)
            seen[label] = out.replace("\n", "; ")
    rows = [{"tree": tree, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t),
             "imported": seen[tree]} for tree, t in times.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    lines = ["| tree | median s | min s | max s | rounds | imported; backend after import (user chose svg) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['tree']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {r['rounds']} | "
              f"{r['imported']} |" for r in rows]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
