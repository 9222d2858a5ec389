"""Learned masks against one-shot magnitude, Wanda and SparseGPT on a tiny Llama, at 50% per layer and 2:4.

A ``LlamaForCausalLM`` (4 layers, width 128, 4 heads over 2 key/value heads, untied head: 1.1M parameters) is
pretrained once on the Python standard library's source (files split into train and held-out by path; byte-level BPE
of 2048 tokens trained here; AdamW, warmup then cosine) and cached in ``benchmarks/.cache/llm``. Its decoder Linears
are then pruned (embeddings and head dense) by each arm, with the same fine-tuning token budget, in three columns:
the weights frozen (``requires_grad_(False)``) under the callback's binary masks (``frozen="mask"``) or soft gates
(``frozen="gate"``), and the weights training (AdamW lr 3e-4). Arms:

* ``dense``: no pruning (fine-tuned in the training column);
* ``one-shot magnitude`` / ``one-shot wanda``: the mask of ``|w|`` per layer, or of Wanda's ``|w_ij| * ||x_j||``
  per output row (Sun et al. 2023; this repository's implementation) on 8 calibration batches; then, in the
  training column, masked fine-tuning with that mask held (``init="from_zeros", fixed=True``);
* ``one-shot SparseGPT / Wanda (llm-compressor)``: llm-compressor 0.14's ``oneshot`` (``SparseGPTModifier``,
  ``WandaPruningModifier``) on 64 training windows, run in a venv the benchmark creates
  (``benchmarks/llm_compressor_oneshot.py``: it pins ``transformers<=5.17``); the head is kept dense (its
  ``ignore=["lm_head"]`` still pruned the head here); then the same masked fine-tuning;
* ``learned``: ``MaskPruningCallback`` defaults (magnitude init, cubic ramp over the first two thirds);
* ``learned (wanda init)``: ``init="wanda"``;
* ``learned gates over SparseGPT's mask``: SparseGPT's pruned weights, its zeros pruned from the first step
  (``init="from_zeros"``, a constant schedule), the kept weights' gates learned;
* ``learned (wanda prior, final pattern from step 0, swaps)``: the final pattern from the first step, from Wanda's
  scores, reselected every 10 steps with regrowth and the straight-through estimator (kept and pruned entries trade
  places); ``same, mask_lr=...``: that arm with the scores' learning rate 1e-3, 3e-3 or 0.05 (0.01 by default);
* ``learned 2:4 patterns, Gumbel-softmax (MaskLLM; wanda prior)``: each group's pattern learned as a choice among
  its six 2:4 patterns, sampled through a Gumbel-softmax in training (``Selector(relaxation=GumbelPatterns())``,
  Fang et al. 2024), Wanda's scores as the prior, 2:4 from the first step, the most probable patterns kept every 10
  steps; its settings are swept in ``llm_gumbel_sweep.py``;
* ``GMP``: the same callback with ``optimizer=MaskOptimizer(lr=0)`` (gradual magnitude pruning).

The arms with ``init="wanda"`` rank ``|w * gate| * rms(x_j)`` (the gates keep the calibration norms) for the whole fit.

Metric: held-out perplexity on 512 fixed non-overlapping windows of 64 tokens, with tokens and wall time per arm.
The commands that made ``results/llm.{jsonl,md}`` are in ``results/llm_commands.sh``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from lightning_masks import (
    GumbelPatterns,
    MaskLogging,
    MaskOptimizer,
    MaskPruningCallback,
    Schedule,
    Selector,
    attach,
    get_initializer,
)
from lightning_masks.masking.activations import input_norms
from lightning_masks.masking.masks import detach, gates_disabled
from lightning_masks.zoo import CausalLM, PythonSourceDataModule, tiny_llama

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "llm"
RESULTS = HERE / "results"
DECODER = ["model.model.layers.*"]  # the decoder Linears of a CausalLM (embeddings and head stay dense)
PATTERNS = {"50%": dict(selector=Selector(mode="layer"), sparsity=0.5), "2:4": dict(selector=Selector(granularity="2:4"))}


def data(seq_len: int, batch_size: int, eval_windows: int, train_chars: int) -> PythonSourceDataModule:
    module = PythonSourceDataModule(cache_dir=str(CACHE / "data"), seq_len=seq_len, batch_size=batch_size,
                                    eval_windows=eval_windows, train_chars=train_chars)
    module.setup()
    return module


def pretrained(datamodule: PythonSourceDataModule, steps: int, lr: float = 2e-3) -> Path:
    """Pretrain the tiny Llama once (plain loop, AdamW, warmup then cosine) and return its saved directory."""
    hparams = datamodule.hparams
    path = CACHE / f"llama_{steps}x{hparams.batch_size}x{hparams.seq_len}_{hparams.train_chars}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=datamodule.hparams.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    windows = datamodule.windows(datamodule.train)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(steps):
        batch = windows[torch.randint(0, len(windows), (datamodule.hparams.batch_size,), generator=generator)]
        loss = nn.functional.cross_entropy(model(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}, held-out perplexity "
                  f"{perplexity(CausalLM(model), datamodule):.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
            model.train()
    model.save_pretrained(path)
    return path


@torch.no_grad()
def perplexity(module: CausalLM, datamodule: PythonSourceDataModule) -> float:
    """Held-out perplexity: exp of the mean next-token loss over the fixed windows."""
    module.eval()
    total, count = 0.0, 0
    for (window,) in datamodule.val_dataloader():
        logits = module(window[:, :-1])
        total += nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten(),
                                             reduction="sum").item()
        count += window[:, 1:].numel()
    return math.exp(total / count)


def one_shot(module: CausalLM, pattern: str, criterion: str, datamodule: PythonSourceDataModule,
             batches: int = 8) -> None:
    """Zero the decoder Linears' weights by ``|w|`` (per layer) or Wanda's score (per output row), to 50% or 2:4."""
    masked = attach(module, DECODER)
    norms = None
    if criterion == "wanda":
        module.eval()
        with gates_disabled(masked), input_norms(masked) as norms, torch.no_grad():
            for index, (window,) in enumerate(datamodule.train_dataloader()):
                if index == batches:
                    break
                module(window[:, :-1])
    detach(module)
    with torch.no_grad():
        for entry in masked:
            weight = entry.weight
            score = weight.abs() * (norms.rms(entry.name) if norms is not None else 1.0)
            if pattern == "2:4":
                groups = score.reshape(-1, 4)
                drop = groups.topk(2, dim=1, largest=False).indices
                keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, drop, False).view_as(weight)
            elif criterion == "wanda":  # Wanda compares within each output row
                drop = score.topk(weight.shape[1] // 2, dim=1, largest=False).indices
                keep = torch.ones_like(weight, dtype=torch.bool).scatter_(1, drop, False)
            else:
                drop = score.flatten().topk(weight.numel() // 2, largest=False).indices
                keep = torch.ones(weight.numel(), dtype=torch.bool).scatter_(0, drop, False).view_as(weight)
            weight.mul_(keep)


COMPRESSOR = "llmcompressor==0.14.*"


def compressor_python() -> Path:
    """The python of a venv holding llm-compressor (created on first use, beside the cache; it shares this
    environment's torch and takes the transformers it pins)."""
    venv = CACHE / "llmcompressor-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", COMPRESSOR], check=True)
    return python


def compressor_one_shot(module: CausalLM, pattern: str, method: str, datamodule: PythonSourceDataModule,
                        source: Path, windows: int = 64) -> None:
    """Prune the decoder Linears with llm-compressor's ``oneshot`` (``wanda`` or ``sparsegpt``) in its own venv, on
    ``windows`` training windows, and load the result; the head stays the dense model's."""
    from safetensors.torch import load_file
    work = CACHE / f"llmc_{method}_{pattern.replace(':', '-').replace('%', 'pct')}_{source.name}"
    if not (work / "model.safetensors").exists():
        calibration = CACHE / "calibration.pt"
        torch.save(datamodule.windows(datamodule.train, windows)[:, :-1].contiguous(), calibration)
        subprocess.run([str(compressor_python()), str(HERE / "llm_compressor_oneshot.py"), str(source), str(work),
                        method, pattern, str(calibration), str(datamodule.tokenizer_dir)], check=True)
    pruned = load_file(work / "model.safetensors")
    decoder = {name: tensor for name, tensor in pruned.items() if name.startswith("model.layers.")}
    missing = module.model.load_state_dict(decoder, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys


def fine_tune(module: CausalLM, datamodule: PythonSourceDataModule, steps: int, callback=None) -> None:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[callback] if callback else [])
    trainer.fit(module, datamodule=datamodule)


class Arm(NamedTuple):
    """One arm: a one-shot pruning first (criterion, or ``None``), a fine-tuning callback factory taking the callback's
    common options (``None``: plain fine-tuning), and the columns it runs in."""

    criterion: Optional[str]
    callback: Optional[Callable[[dict], MaskPruningCallback]]
    columns: tuple = ("mask", "gate", "train")


def held(options: dict) -> MaskPruningCallback:
    """Masked fine-tuning under the one-shot mask left in the weights (held: no mask learning)."""
    return MaskPruningCallback(init=get_initializer("from_zeros", fixed=True), **options)


def from_step_0(pattern: str, init: str, swaps: bool = False) -> dict:
    """The final pattern from the first step (no token spent on a denser model), from the prior ``init`` gives; with
    ``swaps``, every 10 steps each layer (or group of 4) is selected afresh from the learned scores, whose pruned
    entries keep learning through the straight-through estimator, so that kept and pruned entries can trade places."""
    selector = PATTERNS[pattern]["selector"]
    if swaps:
        selector = dataclasses.replace(selector, regrow=True, straight_through=True)
    schedule = Schedule("constant", start=0, **({"update_every": 10} if swaps else {}))
    return dict(init=init, schedule=schedule, selector=selector)


def gumbel_patterns(init: str, **settings) -> dict:
    """MaskLLM's choice among each group's six 2:4 patterns, sampled through a Gumbel-softmax in training (binary
    masks otherwise), the scores starting from ``init``'s prior; every 10 steps the keep-masks take the most probable
    patterns (as the fit ends too)."""
    relaxation = GumbelPatterns(**settings)
    return dict(init=init, schedule=Schedule("constant", start=0, update_every=10),
                selector=Selector(granularity="2:4", relaxation=relaxation))


#: one-shot criterion -> arm name
ONE_SHOT = {"magnitude": "one-shot magnitude", "wanda": "one-shot wanda",
            "llmc-sparsegpt": "one-shot SparseGPT (llm-compressor)", "llmc-wanda": "one-shot Wanda (llm-compressor)"}


def arms(pattern: str) -> dict[str, Arm]:
    """The arms by name. The callbacks' options: the decoder's Linears to ``pattern``, and in a frozen column the
    callback's ``frozen`` mode (``"mask"``: binary masks, ``"gate"``: soft gates)."""
    table = {"dense": Arm(None, None)}
    table.update({name: Arm(criterion, held) for criterion, name in ONE_SHOT.items()})
    table.update({
        "learned": Arm(None, lambda options: MaskPruningCallback(**options)),
        "learned (wanda init)": Arm(None, lambda options: MaskPruningCallback(init="wanda", **options)),
        # SparseGPT's zeros pruned from the first step; its kept weights' gates learn (binary, nothing would change)
        "learned gates over SparseGPT's mask (from_zeros prior)": Arm("llmc-sparsegpt", lambda options: MaskPruningCallback(
            **{**options, **from_step_0(pattern, "from_zeros")}), ("gate", "train")),
        "learned (wanda prior, final pattern from step 0, swaps)": Arm(None, lambda options: MaskPruningCallback(
            **{**options, **from_step_0(pattern, "wanda", swaps=True)})),
        **{f"same, mask_lr={lr:g}": Arm(None, lambda options, lr=lr: MaskPruningCallback(
            **{**options, **from_step_0(pattern, "wanda", swaps=True), "optimizer": MaskOptimizer(lr=lr)})) for lr in (1e-3, 3e-3, 0.05)},
        **({"learned 2:4 patterns, Gumbel-softmax (MaskLLM; wanda prior)": Arm(None, lambda options: MaskPruningCallback(
            **{**options, **gumbel_patterns("wanda")}), ("mask", "train"))} if pattern == "2:4" else {}),
        "GMP (mask_lr=0)": Arm(None, lambda options: MaskPruningCallback(optimizer=MaskOptimizer(lr=0.0), **options),
                                  ("train",)),
    })
    return table


def zeros(module: nn.Module) -> float:
    weights = [m.weight for n, m in module.named_modules() if n.startswith("model.model.layers.")
               and isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


#: the table's columns: weights frozen under binary masks or soft gates (the callback's ``frozen``), or training
COLUMNS = {"mask": "weights frozen, binary masks (frozen='mask')", "gate": "weights frozen, soft gates (frozen='gate')",
           "train": "weights train (AdamW)"}


def run_arm(path: Path, datamodule: PythonSourceDataModule, pattern: str, column: str, arm: str, seed: int,
            steps: int, lr: float) -> dict:
    """One arm of one column: its held-out perplexity, sparsity, fine-tuning tokens and wall time."""
    criterion, callback, _ = arms(pattern)[arm]
    frozen = None if column == "train" else column
    pl.seed_everything(seed, verbose=False)
    module = CausalLM(str(path), lr=lr if column == "train" else 0.0)
    started = time.perf_counter()
    with isolate_rng():  # the calibration draws leave every arm of a seed the same fine-tuning data order
        if criterion and criterion.startswith("llmc-"):
            compressor_one_shot(module, pattern, criterion[5:], datamodule, path)
        elif criterion:
            one_shot(module, pattern, criterion, datamodule)
    if frozen:
        module.model.requires_grad_(False)
    # frozen weights with no mask (dense) or a held one (one-shot) would not change: evaluated as they are
    trains = column == "train" or callback not in (None, held)
    if trains:
        options = dict(targets=DECODER, logging=MaskLogging(histograms=False, plots=False), **PATTERNS[pattern],
                       **({"frozen": frozen} if frozen else {}))
        fine_tune(module, datamodule, steps, callback(options) if callback else None)
    hparams = datamodule.hparams
    return dict(pattern=pattern, arm=arm, column=column, lr=lr if column == "train" else 0.0, seed=seed,
                ppl=perplexity(module, datamodule), sparsity=zeros(module),
                tokens=steps * hparams.batch_size * hparams.seq_len if trains else 0,
                seconds=round(time.perf_counter() - started, 1), steps=steps if trains else 0,
                pretrain_steps=int(path.name.split("_")[1].split("x")[0]))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    datamodule = data(args.seq_len, args.batch_size, args.eval_windows, args.train_chars)
    path = pretrained(datamodule, args.pretrain_steps)
    if args.pretrain_only:
        return
    out = Path(args.out)
    # the dense arm does not depend on the pattern: run once per column and seed, whatever the patterns asked
    done = {(r["pattern"] if r["arm"] != "dense" else "any", r["arm"], r["column"], r["seed"])
            for r in map(json.loads, out.open())} if out.exists() else set()
    for seed in args.seeds:
        for pattern in args.patterns:
            for column in args.columns:
                for arm, spec in arms(pattern).items():
                    key = (pattern if arm != "dense" else "any", arm, column, seed)
                    if key in done or (args.arms and arm not in args.arms) or column not in spec.columns:
                        continue
                    done.add(key)
                    record = run_arm(path, datamodule, pattern, column, arm, seed, args.steps, args.lr)
                    print(json.dumps(record), flush=True)
                    with out.open("a") as stream:
                        stream.write(json.dumps(record) + "\n")
    table(out)


def cell(values: list[float], unit: str = "") -> str:
    """``mean ± std`` (sample standard deviation over seeds) with the number of seeds, or ``-``."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.mean(values):.2f}{unit} ± {statistics.stdev(values):.2f} (n={len(values)})"


def targets(pattern: str, rows: list[dict]) -> list[str]:
    """The issue's questions, per column: in the frozen columns the share of the gap between the best one-shot mask
    and dense that each learned arm closes; where the weights train, whether each learned arm is below every one-shot
    arm followed by masked fine-tuning beyond the seeds' spread (its mean + std under their mean - std)."""
    def ppl(arm: str, column: str) -> list[float]:
        return [r["ppl"] for r in rows if r["arm"] == arm and r["column"] == column]

    learned = [arm for arm, spec in arms(pattern).items() if spec.callback not in (None, held)]
    lines = [""]
    for column in ("mask", "gate"):
        one_shot = {arm: statistics.mean(v) for arm in ONE_SHOT.values() if (v := ppl(arm, column))}
        dense = ppl("dense", column)
        if not one_shot or not dense:
            continue
        best = min(one_shot, key=one_shot.__getitem__)
        gap = one_shot[best] - statistics.mean(dense)
        for arm in learned:
            if values := ppl(arm, column):
                closed = [(one_shot[best] - v) / gap for v in values]
                lines.append(f"* {COLUMNS[column]}: {arm} closes {cell([100 * c for c in closed], '%')} of the gap "
                             f"between {best} ({one_shot[best]:.2f}) and dense ({statistics.mean(dense):.2f})")
    # a spread needs two seeds at least
    spread = {arm: (statistics.mean(v), statistics.stdev(v))
              for arm in [*ONE_SHOT.values(), *learned] if len(v := ppl(arm, "train")) > 1}
    held_arms = [name for name in ONE_SHOT.values() if name in spread]
    for arm in learned:
        if arm in spread and held_arms:
            mean, std = spread[arm]
            beaten = [name for name in held_arms if mean + std < spread[name][0] - spread[name][1]]
            best = min(held_arms, key=lambda name: spread[name][0])
            lines.append(f"* {COLUMNS['train']}: {arm} ({cell(ppl(arm, 'train'))}) is below {len(beaten)} of the "
                         f"{len(held_arms)} one-shot + fine-tuning arms with seeds beyond the seeds' spread (best: "
                         f"{best}, {cell(ppl(best, 'train'))})")
    return lines


def table(path: Path) -> None:
    """Write the markdown table beside ``path``: per pattern, each arm's perplexity in each column (mean ± std over
    seeds), its fine-tuning tokens and mean wall time per column."""
    records = [json.loads(line) for line in path.open()]
    lines = []
    for pattern in PATTERNS:
        if not any(r["pattern"] == pattern for r in records):
            continue
        rows = [r for r in records if r["pattern"] == pattern or r["arm"] == "dense"]
        lines += [f"\n### {pattern} of the decoder Linears\n",
                  "| arm | " + " | ".join(COLUMNS.values()) + " | fine-tuning tokens, wall s (" + " / ".join(COLUMNS)
                  + ") |",
                  "|---" * (len(COLUMNS) + 2) + "|"]
        for arm in arms(pattern):
            cells, costs = [], []
            for column in COLUMNS:
                hits = [r for r in rows if r["arm"] == arm and r["column"] == column]
                cells.append(cell([r["ppl"] for r in hits]))
                costs.append(f"{hits[0]['tokens']:,}, {statistics.mean(r['seconds'] for r in hits):.0f} s" if hits
                             else "-")
            lines.append(f"| {arm} | {' | '.join(cells)} | {' / '.join(costs)} |")
        lines += targets(pattern, rows)
    seeds = sorted({r["seed"] for r in records})
    steps = sorted({r["steps"] for r in records if r["steps"]})
    lrs = sorted({r["lr"] for r in records if r["column"] == "train"})
    header = (f"# LLM pruning: held-out perplexity of a tiny Llama on Python source\n\n"
              f"Generated by `benchmarks/llm.py` (commands: `llm_commands.sh`); seeds {seeds}; pretrained "
              f"{records[0]['pretrain_steps']} steps; fine-tuning {steps} steps; the weights' learning rate where they train {lrs}. Lower is better; mean ± sample std "
              "over the seeds run. See the module docstring for the arms.\n")
    path.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of every arm")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-chars", type=int, default=16_000_000, help="characters of training source read")
    parser.add_argument("--eval-windows", type=int, default=512, help="fixed held-out windows of seq-len tokens")
    parser.add_argument("--pretrain-only", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS))
    parser.add_argument("--lr", type=float, default=3e-4, help="the weights' AdamW learning rate where they train")
    parser.add_argument("--arms", nargs="+", default=None, help="run only these arms (names as in the table)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "llm.jsonl"), help="records (JSON lines); the table beside")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.table_only:
        table(Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
