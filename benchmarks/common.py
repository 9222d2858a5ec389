"""Shared pieces of the benchmarks: data, models, the pruned weights, the sparsity schedule, result files."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_masks import (
    MaskLogging,
    MaskOptimizer,
    MaskPruningCallback,
    MaskState,
    Schedule,
    Selector,
    get_initializer,
)
from lightning_masks.masking import stats
from lightning_masks.zoo.data import FashionMNISTDataModule
from lightning_masks.zoo.models import MLP, LeNet5, LeNet5Caffe

__all__ = [
    "callback_options",
    "MODELS",
    "RESULTS",
    "append_jsonl",
    "build_model",
    "callback_arguments",
    "callback_defaults",
    "load_fashion_mnist",
    "markdown_table",
    "mean_std",
    "prunable",
    "read_jsonl",
    "sparsity_counts",
    "target_count",
    "target_sparsity",
    "zero_rows",
]

RESULTS = Path(__file__).resolve().parent / "results"

#: The callback's options as the benchmarks write them (``masks[mask_lr=0.05]``, ``end=0.5``, ``plots=False``), each
#: a field of one of its strategy objects: option -> (argument, field).
STRATEGY_OPTIONS = {
    "start": ("schedule", "start"), "end": ("schedule", "end"), "update_every": ("schedule", "update_every"),
    "update_budget": ("schedule", "update_budget"), "early_end": ("schedule", "early_end"),
    "temperature": ("state", "temperature"), "rescale_gate": ("state", "rescale_gate"),
    "score_dtype": ("state", "score_dtype"), "compact": ("state", "compact"),
    "mask_lr": ("optimizer", "lr"), "mask_weight_decay": ("optimizer", "weight_decay"),
    "fused_adam": ("optimizer", "fused_adam"),
    "log_every_n_steps": ("logging", "every_n_steps"), "log_histograms": ("logging", "histograms"),
    "plots": ("logging", "plots"),
}
STRATEGIES = {"schedule": Schedule, "state": MaskState, "optimizer": MaskOptimizer, "logging": MaskLogging}


def callback_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """``MaskPruningCallback``'s arguments from flat options: each strategy field (:data:`STRATEGY_OPTIONS`) goes
    into its object, a named schedule becoming ``Schedule(name, ...)`` and a given object a copy with the fields."""
    arguments = {key: value for key, value in options.items() if key not in STRATEGY_OPTIONS}
    fields: dict[str, dict[str, Any]] = {}
    for key in options.keys() & STRATEGY_OPTIONS.keys():
        argument, field = STRATEGY_OPTIONS[key]
        fields.setdefault(argument, {})[field] = options[key]
    for argument, values in fields.items():
        given = arguments.get(argument)
        if isinstance(given, str):  # a schedule by name
            given = Schedule(given)
        arguments[argument] = STRATEGIES[argument](**values) if given is None else dataclasses.replace(given, **values)
    return arguments


def callback_options(options: dict[str, Any], shift: float | None = None) -> dict[str, Any]:
    """The callback's arguments from an arm's options: ``init=NAME,init.OPTION=VALUE`` as
    ``init=get_initializer(NAME, OPTION=VALUE)`` (e.g. ``init.noise_scale``; ``shift`` is the default of
    ``init.shift`` there), and a :class:`Selector`'s fields (``importance``, ``regrow``, ``straight_through``, ...) as
    ``selector=Selector(...)``."""
    init_kwargs = {k.removeprefix("init."): options.pop(k) for k in [k for k in options if k.startswith("init.")]}
    if init_kwargs:
        if shift is not None:
            init_kwargs.setdefault("shift", shift)
        options["init"] = get_initializer(options.get("init", "magnitude"), **init_kwargs)
    selector_kwargs = {k: options.pop(k) for k in [k for k in options if k in Selector.__dataclass_fields__]}
    if selector_kwargs:
        options["selector"] = dataclasses.replace(options.get("selector", Selector()), **selector_kwargs)
    return options


def callback_defaults() -> dict[str, Any]:
    """The callback's defaults as flat options (the strategy objects' fields under :data:`STRATEGY_OPTIONS`' names),
    recorded with runs so that a later change of a default shows in their labels."""
    parameters = inspect.signature(MaskPruningCallback).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
                and not (p.name in STRATEGIES and p.default is None)}  # an object's defaults are its fields'
    for option, (argument, field) in STRATEGY_OPTIONS.items():
        defaults[option] = getattr(STRATEGIES[argument], field)
    return defaults

#: Model name -> constructor of the LightningModule (Adam lr 1e-3 unless told otherwise).
MODELS = {
    "lenet300": lambda lr: MLP(in_features=784, hidden=(300, 100), lr=lr),
    "lenet5": lambda lr: LeNet5(lr=lr),  # 6-16-120-84, first conv padded: 61,470 weights
    "lenet5_caffe": lambda lr: LeNet5Caffe(lr=lr),  # 20-50-800-500: 430,500 weights, the literature's LeNet-5
}


def build_model(name: str, lr: float = 1e-3) -> nn.Module:
    """Return a fresh model by name (seed torch first for a reproducible init)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name](lr)


def load_fashion_mnist(root: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Return Fashion-MNIST as in-memory ``(inputs, targets)`` for ``train`` (55k), ``val`` (5k) and ``test`` (10k)."""
    splits = (FashionMNISTDataModule(root) if root else FashionMNISTDataModule()).load()
    return {name: tuple(split.tensors) for name, split in zip(("train", "val", "test"), splits)}


#: The layers every method prunes (their weights).
PRUNABLE = (nn.Linear, nn.Conv2d)


def prunable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every Linear/Conv2d: the weights every method prunes."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            yield name, module


def zero_rows(model: nn.Module) -> list[dict]:
    """The package's per-layer rows (:func:`lightning_masks.masking.stats.zero_rows`) of the prunable weights of a plain
    model: exact zeros as they are now (measured, not assumed)."""
    return stats.zero_rows(model, list(PRUNABLE))


def sparsity_counts(model: nn.Module) -> tuple[int, int]:
    """Return ``(exact zeros, total)`` over the prunable weights of a plain model."""
    return stats.pruned_and_total(zero_rows(model))


def target_sparsity(final: float, epoch: int, start: int, end: int) -> float:
    """The common cubic schedule (Zhu & Gupta 2017): the target as epoch ``epoch`` starts."""
    return Schedule("cubic", final=final, start=start, end=end).value(epoch, start, end)


def target_count(final: float, epoch: int, start: int, end: int, total: int) -> int:
    """The number of weights pruned at the start of ``epoch``: ``round(target * total)``."""
    return round(target_sparsity(final, epoch, start, end) * total)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (flushed, so a killed grid keeps what finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read every record of a JSONL file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Render a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
