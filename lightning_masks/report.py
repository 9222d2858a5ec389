"""The ``lightning-masks-report`` command: a sweep folder -> a table (markdown, CSV) and a PNG plot.

``lightning-masks-report multirun/2026-01-01/12-00-00`` reads every job of the sweep (its
``.hydra/overrides.yaml``, ``.hydra/config.yaml`` and ``result.json``), lists jobs that failed, left no
result, or never ran, and writes ``report.md``, ``report.csv`` and ``report.png`` into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from .plots import plot_sweep
from .train import RESULT_FILE

__all__ = ["COLUMNS", "collect", "expected_jobs", "main", "to_markdown", "write_csv"]

#: The table's columns, in order.
COLUMNS = ("job", "status", "overrides", "init", "noise_scale", "noise_used", "sparsity", "test_acc", "val_acc",
           "time_s", "error")
OVERRIDES = Path(".hydra") / "overrides.yaml"
CONFIG = Path(".hydra") / "config.yaml"


def expected_jobs(sweep_dir: Path) -> Optional[list[list[str]]]:
    """Return the override lists of every job a basic-sweeper sweep launches, or ``None`` when unknown.

    Expands the sweep's ``multirun.yaml`` as Hydra's basic sweeper does (command-line overrides and
    ``hydra.sweeper.params``). Other sweepers (Optuna) choose their jobs as they go: ``None``.
    """
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    config = OmegaConf.load(path)
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_") or ""
    if not sweeper.endswith("BasicSweeper"):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _override(overrides: Sequence[str], key: str) -> Optional[str]:
    for item in overrides:
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return None


def _job_row(job_dir: Path, sweep_dir: Path, metric: str) -> dict[str, Any]:
    overrides = list(OmegaConf.load(job_dir / OVERRIDES))
    config = OmegaConf.load(job_dir / CONFIG) if (job_dir / CONFIG).is_file() else OmegaConf.create()
    result = _load_json(job_dir / RESULT_FILE)
    init = OmegaConf.select(config, "masks.init.name") or _override(overrides, "masks/init") or ""
    row = {"job": str(job_dir.relative_to(sweep_dir)), "overrides": overrides, "init": init,
           "noise_scale": OmegaConf.select(config, "masks.init.noise_scale"), "noise_used": None}
    if result is None:
        return {**row, "status": "no result", "error": f"no readable {RESULT_FILE}: killed, still running, or crashed"}
    if result.get("status") != "ok":
        return {**row, "status": "failed", "error": result.get("error", "unknown error")}
    metrics = result.get("metrics", {})
    used = "noise_scale" in result.get("init", {})
    return {**row, "status": "ok", "noise_used": used,
            "noise_scale": result["init"]["noise_scale"] if used else row["noise_scale"],
            "sparsity": result.get("sparsity"), "test_acc": metrics.get(metric),
            "val_acc": metrics.get("val/acc"), "time_s": result.get("time_s")}


def collect(sweep_dir: str | Path, metric: str = "test/acc") -> list[dict[str, Any]]:
    """Return one row per job of the sweep, including failed jobs and jobs that never ran (status ``missing``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist; pass the folder a multirun wrote, "
                                "e.g. multirun/2026-01-01/12-00-00")
    job_dirs = sorted((path.parent.parent for path in sweep_dir.rglob(str(OVERRIDES))),
                      key=lambda path: [int(p) if p.isdigit() else p for p in path.relative_to(sweep_dir).parts])
    rows = [_job_row(job_dir, sweep_dir, metric) for job_dir in job_dirs if job_dir != sweep_dir]
    seen = {frozenset(row["overrides"]) for row in rows}
    for overrides in expected_jobs(sweep_dir) or []:
        if frozenset(overrides) not in seen:
            rows.append({"job": "-", "status": "missing", "overrides": overrides,
                         "init": _override(overrides, "masks/init") or "", "noise_scale": None, "noise_used": None,
                         "error": "the sweep lists this job but no folder has its overrides"})
    if not rows:
        raise FileNotFoundError(f"no job folders (with {OVERRIDES}) under {sweep_dir}; is it a sweep folder?")
    return rows


def _cell(row: dict[str, Any], column: str, common: frozenset = frozenset()) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if column == "overrides":
        return " ".join(item for item in value if item not in common)
    if column == "noise_scale" and row.get("noise_used") is False:
        return f"{value:g} (unused)" if isinstance(value, (int, float)) else ""
    if isinstance(value, float):
        return f"{value:.1f}" if column == "time_s" else f"{value:.4g}"
    return str(value)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Return the rows as a markdown table: overrides shared by every job are listed once above it, failures below."""
    columns = [c for c in COLUMNS if c not in ("error", "noise_used")]
    common = frozenset.intersection(*(frozenset(row["overrides"]) for row in rows)) if len(rows) > 1 else frozenset()
    lines = [f"Overrides of every job: `{' '.join(sorted(common))}`", ""] if common else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row, c, common).replace("|", "\\|") for c in columns) + " |" for row in rows]
    problems = [row for row in rows if row["status"] != "ok"]
    if problems:
        lines += ["", f"**{len(problems)} of {len(rows)} jobs did not finish:**", ""]
        lines += [f"- job {row['job']} ({' '.join(row['overrides'])}): {row['status']}: "
                  f"{str(row.get('error', '')).splitlines()[0] if row.get('error') else ''}" for row in problems]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the rows, every column, as CSV."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: " ".join(row["overrides"]) if c == "overrides" else row.get(c) for c in COLUMNS})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lightning-masks-report``: exit status 0 when every job is ok, 2 when some are not."""
    parser = argparse.ArgumentParser(prog="lightning-masks-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the folder of a sweep (multirun/DATE/TIME)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    parser.add_argument("--metric", default="test/acc", help="the accuracy to report (default: test/acc)")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.sweep_dir, args.metric)
    except FileNotFoundError as error:
        parser.error(str(error))
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    (out / "report.md").write_text(markdown)
    write_csv(rows, out / "report.csv")
    plot_sweep(rows, out / "report.png", title=f"{args.sweep_dir} ({args.metric})")
    print(markdown)
    ok = sum(row["status"] == "ok" for row in rows)
    print(f"{ok} of {len(rows)} jobs ok; wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}",
          file=sys.stderr)
    return 0 if ok == len(rows) else 2


if __name__ == "__main__":
    sys.exit(main())
