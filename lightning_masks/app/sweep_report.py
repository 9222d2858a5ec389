"""The ``lightning-masks-report`` command: a sweep folder -> tables (markdown, CSV) and a PNG plot.

``lightning-masks-report multirun/2026-01-01/12-00-00`` reads every job of the sweep (its
``.hydra/overrides.yaml``, ``.hydra/config.yaml`` and ``result.json``), lists jobs that failed, left no
result, or never ran, groups the jobs that differ only in ``seed`` into one configuration (mean ± std over
its seeds, and whether it is distinguishable from the best configuration at its sparsity by Welch's t-test),
and writes ``report.md``, ``report.csv`` (one row per job), ``configs.csv`` (one row per configuration) and
``report.png`` (configuration means with ±1 std error bars) into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from scipy.stats import ttest_ind

from .sweep_plot import plot_sweep
from .train import RESULT_FILE

__all__ = ["collect", "main"]

#: The table's columns, in order.
_COLUMNS = ("job", "status", "overrides", "init", "noise_scale", "noise_used", "sparsity", "test_acc", "val_acc",
           "time_s", "error")
#: The configuration table's columns, in order (``test_acc`` is the mean over seeds).
_CONFIG_COLUMNS = ("config", "init", "noise_scale", "sparsity", "seeds", "test_acc", "test_acc_std", "p_vs_best",
                  "mark", "not_ok")
#: Significance level of the Welch t-test against the best configuration.
_ALPHA = 0.05
_SEED_KEY = "seed"
OVERRIDES = Path(".hydra") / "overrides.yaml"
CONFIG = Path(".hydra") / "config.yaml"


def _expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
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
    choices: dict[str, list[str]] = {}  # the basic sweeper's product: a later override of a key replaces an earlier
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        values = override.sweep_string_iterator() if override.is_sweep_override() else [
            override.get_value_element_as_str()]
        choices[key] = [f"{key}={value}" for value in values]
    return [list(job) for job in itertools.product(*choices.values())]


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _override(overrides: Sequence[str], key: str) -> str | None:
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
    for overrides in _expected_jobs(sweep_dir) or []:
        if frozenset(overrides) not in seen:
            rows.append({"job": "-", "status": "missing", "overrides": overrides,
                         "init": _override(overrides, "masks/init") or "", "noise_scale": None, "noise_used": None,
                         "error": "the sweep lists this job but no folder has its overrides"})
    if not rows:
        raise FileNotFoundError(f"no job folders (with {OVERRIDES}) under {sweep_dir}; is it a sweep folder?")
    return rows


def _is_seed(override: str) -> bool:
    return override.partition("=")[0].lstrip("+~") == _SEED_KEY


def _group_seeds(rows: Sequence[dict[str, Any]], alpha: float = _ALPHA) -> list[dict[str, Any]]:
    """Group the jobs that differ only in ``seed`` into configurations, and mark those the best cannot be told from.

    Each configuration gets the mean and sample standard deviation of ``test_acc`` over its ok jobs
    (``seeds`` of them; ``not_ok`` counts the others). The best configuration is the one with the highest
    mean among those of its final sparsity (rounded to 4 decimals; configurations at different sparsities
    are not compared). Every other one at that sparsity is compared with it by Welch's t-test
    (``scipy.stats.ttest_ind(equal_var=False)``, two-sided): ``p_vs_best`` is its p-value, and ``mark`` is
    ``"best"``, ``"~best"`` (p >= ``alpha``: indistinguishable from the best with these seeds), ``""``
    (p < ``alpha``: worse beyond the seeds' noise) or ``"?"`` (untestable: fewer than 2 seeds on either side,
    or no spread on both).

    Args:
        rows: job rows as :func:`collect` returns them.
        alpha: the test's significance level.

    Returns:
        One dict per configuration (keys :data:`_CONFIG_COLUMNS`, plus ``overrides``: the job overrides
        without ``seed``, and ``values``: the accuracies), in order of first appearance.
    """
    groups: dict[frozenset, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(frozenset(o for o in row["overrides"] if not _is_seed(o)), []).append(row)
    configs = []
    for key, members in groups.items():
        ok = [row for row in members if row["status"] == "ok" and row.get("test_acc") is not None]
        values = [float(row["test_acc"]) for row in ok]
        sparsities = [float(row["sparsity"]) for row in ok if row.get("sparsity") is not None]
        first = members[0]
        configs.append({
            "overrides": [o for o in first["overrides"] if not _is_seed(o)], "config": "", "init": first["init"],
            "noise_scale": first["noise_scale"], "noise_used": first["noise_used"],
            "sparsity": statistics.fmean(sparsities) if sparsities else None, "seeds": len(values), "values": values,
            "test_acc": statistics.fmean(values) if values else None,
            "test_acc_std": statistics.stdev(values) if len(values) > 1 else None,
            "p_vs_best": None, "mark": "", "not_ok": len(members) - len(ok)})
    by_sparsity: dict[float, list[dict[str, Any]]] = {}
    for config in configs:
        if config["test_acc"] is not None and config["sparsity"] is not None:
            by_sparsity.setdefault(round(config["sparsity"], 4), []).append(config)
    for candidates in by_sparsity.values():
        best = max(candidates, key=lambda config: config["test_acc"])
        best["mark"] = "best"
        for config in candidates:
            if config is best:
                continue
            testable = min(len(config["values"]), len(best["values"])) >= 2 and (
                config["test_acc_std"] or best["test_acc_std"])
            if not testable:
                config["mark"] = "?"
                continue
            p = float(ttest_ind(config["values"], best["values"], equal_var=False).pvalue)
            config["p_vs_best"] = p
            config["mark"] = "?" if math.isnan(p) else ("~best" if p >= alpha else "")
    return configs


def _configs_to_markdown(configs: Sequence[dict[str, Any]], alpha: float = _ALPHA) -> str:
    """Return the configurations as a markdown table: one row each, mean ± std over its seeds, and the marks."""
    common = (frozenset.intersection(*(frozenset(c["overrides"]) for c in configs)) if len(configs) > 1
              else frozenset())
    lines = ["| config | init | noise_scale | sparsity | seeds | test_acc (mean ± std) | p vs best | mark |",
             "|---|---|---|---|---|---|---|---|"]
    for config in configs:
        label = " ".join(o for o in config["overrides"] if o not in common) or "(all)"
        mean = config["test_acc"]
        accuracy = "" if mean is None else f"{mean:.4f}" + (
            f" ± {config['test_acc_std']:.4f}" if config["test_acc_std"] is not None else "")
        p = "" if config["p_vs_best"] is None else f"{config['p_vs_best']:.3g}"
        seeds = f"{config['seeds']}" + (f" ({config['not_ok']} not ok)" if config["not_ok"] else "")
        cells = [label, config["init"] or "", _cell(config, "noise_scale"), _cell(config, "sparsity"), seeds,
                 accuracy, p, config["mark"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", f"mark: `best` is the highest mean at its sparsity; `~best`: Welch's t-test cannot tell it from "
                  f"the best (p >= {alpha}), so the difference may be seed noise; empty: worse beyond the seeds' "
                  "noise (p < {alpha}); `?`: untestable (fewer than 2 seeds, or no spread)."
              .replace("{alpha}", str(alpha))]
    return "\n".join(lines) + "\n"


def _with_series(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Name each configuration's plot series: its init, plus the overrides that vary across the sweep other than
    the init, its noise and the sparsity (the plot's own axes), e.g. ``magnitude masks.state.rescale_gate=False``."""
    axes = ("masks/init", "masks.init.noise_scale", "masks.sparsity")
    values: dict[str, set] = {}
    for config in configs:
        for item in config["overrides"]:
            key, _, value = item.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    varying = {key for key, seen in values.items() if key not in axes and len(seen) > 1}
    named = []
    for config in configs:
        extra = [item for item in config["overrides"] if item.partition("=")[0].lstrip("+~") in varying]
        named.append({**config, "series": " ".join([config["init"] or "?", *extra])})
    return named


def _write_configs_csv(configs: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the configurations, one row each (columns :data:`_CONFIG_COLUMNS`), as CSV."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=_CONFIG_COLUMNS)
        writer.writeheader()
        for config in configs:
            writer.writerow({c: " ".join(config["overrides"]) if c == "config" else config.get(c)
                             for c in _CONFIG_COLUMNS})


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


def _to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Return the rows as a markdown table: overrides shared by every job are listed once above it, failures below."""
    columns = [c for c in _COLUMNS if c not in ("error", "noise_used")]
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


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the rows, every column, as CSV."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: " ".join(row["overrides"]) if c == "overrides" else row.get(c) for c in _COLUMNS})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-masks-report``: exit status 0 when every job is ok, 2 when some are not."""
    parser = argparse.ArgumentParser(prog="lightning-masks-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the folder of a sweep (multirun/DATE/TIME)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    parser.add_argument("--metric", default="test/acc", help="the accuracy to report (default: test/acc)")
    parser.add_argument("--alpha", type=float, default=_ALPHA,
                        help=f"significance level of the Welch t-test against the best (default {_ALPHA})")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.sweep_dir, args.metric)
    except FileNotFoundError as error:
        parser.error(str(error))
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    configs = _group_seeds(rows, args.alpha)
    markdown = (f"## Configurations (jobs that differ only in `{_SEED_KEY}` grouped)\n\n"
                f"{_configs_to_markdown(configs, args.alpha)}\n## Jobs\n\n{_to_markdown(rows)}")
    (out / "report.md").write_text(markdown)
    _write_csv(rows, out / "report.csv")
    _write_configs_csv(configs, out / "configs.csv")
    plot_sweep(_with_series(configs), out / "report.png", series="series",
               title=f"{args.sweep_dir} ({args.metric}, mean ± std over seeds)")
    print(markdown)
    ok = sum(row["status"] == "ok" for row in rows)
    print(f"{ok} of {len(rows)} jobs ok, {len(configs)} configurations; wrote {out / 'report.md'}, "
          f"{out / 'report.csv'}, {out / 'configs.csv'}, {out / 'report.png'}", file=sys.stderr)
    return 0 if ok == len(rows) else 2


if __name__ == "__main__":
    sys.exit(main())
