"""Learned masks against one-shot magnitude and Wanda on a tiny Llama, at 50% per layer and 2:4.

A ``LlamaForCausalLM`` (4 layers, width 128, grouped-query attention, untied head) is pretrained once on the Python
standard library's source (files split into train and held-out by path; byte-level BPE trained here) and cached in
``benchmarks/.cache/llm``. Its decoder Linears are then pruned (embeddings and head dense) by each arm, with the same
fine-tuning token budget, in two columns: the weights frozen (lr 0: only masks learn) and the weights training
(AdamW lr 3e-4). Arms:

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
* ``GMP``: the same callback with ``mask_lr=0`` (gradual magnitude pruning).

Metric: held-out perplexity on fixed non-overlapping windows, with tokens and wall time per arm.

    nice -n 10 python benchmarks/llm.py --steps 100 --seeds 0   # results/llm.jsonl, results/llm.md
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_masks import MaskLogging, MaskOptimizer, MaskPruningCallback, Selector, attach, get_initializer
from lightning_masks.masking.activations import input_norms
from lightning_masks.masking.masks import detach, gates_disabled
from lightning_masks.zoo import CausalLM, PythonSourceDataModule, tiny_llama

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "llm"
RESULTS = HERE / "results"
DECODER = ["model.model.layers.*"]  # the decoder Linears of a CausalLM (embeddings and head stay dense)
PATTERNS = {"50%": dict(selector=Selector(mode="layer"), sparsity=0.5), "2:4": dict(selector=Selector(granularity="2:4"))}


def data(seq_len: int, batch_size: int, eval_windows: int) -> PythonSourceDataModule:
    module = PythonSourceDataModule(cache_dir=str(CACHE / "data"), seq_len=seq_len, batch_size=batch_size,
                                    eval_windows=eval_windows)
    module.setup()
    return module


def pretrained(datamodule: PythonSourceDataModule, steps: int, lr: float = 2e-3) -> Path:
    """Pretrain the tiny Llama once (plain loop, AdamW, warmup then cosine) and return its saved directory."""
    path = CACHE / f"llama_{steps}x{datamodule.hparams.batch_size}x{datamodule.hparams.seq_len}"
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
        if step % 25 == 0:
            print(f"pretrain step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
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


def arms(pattern: str) -> dict:
    """Name -> (one-shot criterion or None, callback factory or None)."""
    options = dict(targets=DECODER, logging=MaskLogging(histograms=False, plots=False), **PATTERNS[pattern])
    return {
        "dense": (None, None),
        "one-shot magnitude": ("magnitude", lambda: MaskPruningCallback(
            init=get_initializer("from_zeros", fixed=True), **options)),
        "one-shot wanda": ("wanda", lambda: MaskPruningCallback(
            init=get_initializer("from_zeros", fixed=True), **options)),
        "one-shot SparseGPT (llm-compressor)": ("llmc-sparsegpt", lambda: MaskPruningCallback(
            init=get_initializer("from_zeros", fixed=True), **options)),
        "one-shot Wanda (llm-compressor)": ("llmc-wanda", lambda: MaskPruningCallback(
            init=get_initializer("from_zeros", fixed=True), **options)),
        "learned": (None, lambda: MaskPruningCallback(**options)),
        "learned (wanda init)": (None, lambda: MaskPruningCallback(init="wanda", **options)),
        "GMP (mask_lr=0)": (None, lambda: MaskPruningCallback(optimizer=MaskOptimizer(lr=0.0), **options)),
    }


def zeros(module: nn.Module) -> float:
    weights = [m.weight for n, m in module.named_modules() if n.startswith("model.model.layers.")
               and isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    datamodule = data(args.seq_len, args.batch_size, args.eval_windows)
    path = pretrained(datamodule, args.pretrain_steps)
    if args.pretrain_only:
        return
    out = Path(args.out)
    done = {(r["pattern"], r["arm"], r["lr"], r["seed"]) for r in map(json.loads, out.open())} if out.exists() else set()
    tokens = args.steps * args.batch_size * args.seq_len
    for seed in args.seeds:
        for pattern in args.patterns:
            for arm, (criterion, callback) in arms(pattern).items():
                for lr in args.lrs:
                    if (pattern, arm, lr, seed) in done or (arm == "dense" and pattern != args.patterns[0]):
                        continue
                    pl.seed_everything(seed, verbose=False)
                    module = CausalLM(str(path), lr=lr)
                    started = time.perf_counter()
                    if criterion and criterion.startswith("llmc-"):
                        compressor_one_shot(module, pattern, criterion[5:], datamodule, path)
                    elif criterion:
                        one_shot(module, pattern, criterion, datamodule)
                    trains = (lr > 0 or callback is not None) and not (criterion and lr == 0)
                    if trains:  # a held mask over frozen weights would not change: evaluated as it is
                        fine_tune(module, datamodule, args.steps, callback() if callback else None)
                    record = dict(pattern=pattern, arm=arm, lr=lr, seed=seed, ppl=perplexity(module, datamodule),
                                  sparsity=zeros(module), tokens=tokens if trains else 0,
                                  seconds=round(time.perf_counter() - started, 1), pretrain_steps=args.pretrain_steps)
                    print(json.dumps(record), flush=True)
                    with out.open("a") as stream:
                        stream.write(json.dumps(record) + "\n")
    table(out)


def table(path: Path) -> None:
    """Write the markdown table beside ``path``."""
    records = [json.loads(line) for line in path.open()]
    lines = []
    for pattern in PATTERNS:
        if not any(r["pattern"] == pattern for r in records):
            continue
        rows = [r for r in records if r["pattern"] == pattern or r["arm"] == "dense"]
        lines += [f"\n### {pattern} of the decoder Linears\n", "| arm | weights frozen (lr 0) | weights train (lr 3e-4) |"
                  " tokens | wall s (lr 0 / 3e-4) |", "|---|---|---|---|---|"]
        for arm in arms(pattern):
            cells, seconds, tokens = [], [], 0
            for lr in (0.0, 3e-4):
                hits = [r for r in rows if r["arm"] == arm and r["lr"] == lr]
                ppl = [r["ppl"] for r in hits]
                mean = sum(ppl) / len(ppl) if ppl else float("nan")
                spread = (max(ppl) - min(ppl)) / 2 if len(ppl) > 1 else None
                cells.append("-" if not ppl else f"{mean:.2f}" + (f" ± {spread:.2f}" if spread else ""))
                seconds.append(str(round(sum(r["seconds"] for r in hits) / len(hits))) if hits else "-")
                tokens = max([tokens] + [r["tokens"] for r in hits])
            lines.append(f"| {arm} | {cells[0]} | {cells[1]} | {tokens:,} | {' / '.join(seconds)} |")
    seeds = sorted({r["seed"] for r in records})
    header = (f"# LLM pruning: held-out perplexity of a tiny Llama on Python source\n\n"
              f"Generated by `benchmarks/llm.py`; seeds {seeds}; pretrained {records[0]['pretrain_steps']} steps. "
              "Lower is better. See the module docstring for the arms.\n")
    path.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=50, help="fine-tuning steps of every arm")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=128, help="fixed held-out windows of seq-len tokens")
    parser.add_argument("--pretrain-only", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.0, 3e-4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "llm.jsonl"), help="records (JSON lines); the table beside")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.table_only:
        table(Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
