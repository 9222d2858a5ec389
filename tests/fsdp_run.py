"""Prune a tiny Llama under FSDP2 (ModelParallelStrategy, 2 CPU processes, gloo); run by tests/test_fsdp.py.

One run covers the lifecycle: a fit with distributed checkpoints whose last epoch ends in a recording of the sharded
masks (gathered for the test to compare with one process's selection on the same tensors), the folded model's
forward and export from rank 0, a resume from its epoch-1 checkpoint, a fit with full checkpoints that ends early,
and its resume (those two with the layers built in configure_model). Each rank writes what it saw under OUT_DIR.

Usage: python tests/fsdp_run.py OUT_DIR
"""

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_masks import (
    MaskLogging,
    MaskPruningCallback,
    MaskState,
    Schedule,
    Selector,
    attach,
    full_state_dict,
    mask_before_sharding,
    masked_tensors,
)
from lightning_masks.lightning.sharding import reshard
from lightning_masks.masking import local_entries, shard_with_weights
from lightning_masks.masking.sharded import mask_state_bytes
from lightning_masks.selection import across_shards

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
#: selections checked on the recorded tensors: (name, selector, target); the floor binds in "floor"
CHECKS = [("global", Selector(), 0.9), ("floor", Selector(layer_floor=0.9), 0.9),
          ("layer", Selector(mode="layer"), 0.85), ("gate", Selector(importance="gate"), 0.95),
          ("threshold", Selector(), 0.45)]
#: selections on freshly masked, sharded tiny Llamas: (name, attach options, selector, target, weights rounded to
#: one decimal so that many importances tie at the cut)
GRAINS = [("channel", dict(per_channel=True), Selector(granularity="channel"), 0.5, False),
          ("channel-layer", dict(per_channel=True), Selector(granularity="channel", mode="layer"), 0.5, False),
          ("2:4", {}, Selector(granularity="2:4"), 0.5, False),
          ("ties", {}, Selector(), 0.7, True), ("ties-floor", {}, Selector(layer_floor=0.9), 0.9, True),
          # each tensor half pruned: its first rows (one process's shard) mostly, its last ones little
          ("straddle", {"prepruned": True}, Selector(), 0.7, False)]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


class TinyLlamaModule(pl.LightningModule):
    """A causal LM with its decoder layers sharded in ``configure_model``, as FSDP2 users write it; built there too
    with ``build_in_configure_model`` (then masked by the one line before sharding)."""

    def __init__(self, build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.build_in_configure_model = build_in_configure_model
        self.model = None if build_in_configure_model else tiny_llama()

    def configure_model(self) -> None:
        if getattr(self.model, "_sharded", False):
            return
        if self.model is None:
            self.model = tiny_llama()
            mask_before_sharding(self)
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.model._sharded = True

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (tokens,) = batch
        self.log("val_loss", self.model(input_ids=tokens, labels=tokens).loss)

    def val_dataloader(self):
        return self.train_dataloader()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randint(0, 64, (32, 16), generator=generator)), batch_size=8)


def gathered(masked) -> dict:
    """Every masked tensor's state, gathered whole (a collective call)."""
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t.clone()  # noqa: E731 (0-dim: whole)
    return {entry.name: {"weight": full(entry.weight.detach()), "scores": full(entry.gate.scores.detach()),
                         "keep": full(entry.gate.keep), "gate_scale": full(entry.gate.gate_scale)}
            for entry in masked}


class Record(Callback):
    """At the last epoch's end (before the fold): the sharded masks, gathered; the mask state each rank holds; and
    the keep bits of each check in CHECKS, chosen on the shards, gathered (then the masks are put back)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        reshard(pl_module)  # the validation forward left the root module's parameters gathered
        masked = masked_tensors(pl_module)
        scores = [entry.gate.scores for entry in masked]
        moments = [t for p in scores for t in trainer.optimizers[0].state[p].values() if t.dim()]  # Adam's, sharded
        record = {"state": gathered(masked), "bytes": mask_state_bytes(masked),
                  "whole_bytes": sum(t.numel() * t.element_size() for e in masked
                                     for t in [*e.gate._parameters.values(), *e.gate._buffers.values()]
                                     if t is not None),
                  "optimizer_bytes": sum(t.to_local().numel() * t.element_size() for t in moments),
                  "whole_optimizer_bytes": sum(t.numel() * t.element_size() for t in moments),
                  "checks": {}}
        local = local_entries(masked)
        saved = [(t, t.clone()) for entry in local for t in entry.gate._parameters.values()]
        for name, selector, target in CHECKS:
            with across_shards(trainer.strategy.device_mesh["data_parallel"].get_group()):
                select = selector.threshold if name == "threshold" else selector
                pruned = select(local, target).pruned
            record["checks"][name] = (pruned, {entry.name: entry.gate.keep.full_tensor().clone() for entry in masked})
            for tensor, value in saved:  # the shards as they were (scores, and keep bits where held apart)
                tensor.copy_(value)
        torch.save(record, self.out / f"record-rank{trainer.global_rank}.pt")


class StopAfter(Callback):
    """End the fit after epoch ``epoch`` (as EarlyStopping would), before its ramp ends."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


def fit(out: Path, *, distributed: bool, ckpt_path=None, extra=(), build_in_configure_model=False,
        early_end="warn", state=None) -> tuple:
    pl.seed_everything(0, verbose=False)
    module = TinyLlamaModule(build_in_configure_model)
    pruner = MaskPruningCallback(0.8, schedule=Schedule(end=2, update_budget=None, early_end=early_end), state=state,
                                 logging=MaskLogging(every_n_steps=1, plots=False))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=3, deterministic=True,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                       save_distributed_checkpoint=distributed, timeout=timedelta(minutes=3)),
        callbacks=[pruner, ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=-1), *extra],
        logger=CSVLogger(out, name="logs"), enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    torch.save({"pruned": pruner.plan.pruned, "position": pruner.plan.position, "masked": len(masked_tensors(module))},
               out / f"end-rank{trainer.global_rank}.pt")
    return trainer, module, pruner


def folded_outputs(trainer, module, pruner, out: Path) -> None:
    """The folded model's forward under FSDP2 and its full state dict, exported from rank 0."""
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = module(tokens)
    state = full_state_dict(module)
    if trainer.is_global_zero:
        torch.save({"state": state, "logits": logits, "tokens": tokens, "pruned": pruner.plan.pruned,
                    "masked": len(masked_tensors(module))}, out / "export.pt")


def masked_llama(options: dict, rounded: bool):
    """A tiny Llama with masks, as one process builds it (its weights rounded to one decimal with ``rounded``)."""
    options = dict(options)
    prepruned = options.pop("prepruned", False)
    model = tiny_llama()
    if rounded:
        with torch.no_grad():
            for param in model.parameters():
                param.round_(decimals=1)
    masked = attach(model, exclude=["model.embed_tokens"], rescale=True, compact=True, **options)
    for entry in masked if prepruned else []:
        keep = torch.ones_like(entry.gate.keep)
        rows, columns = keep.shape
        keep[:rows // 2, :columns * 3 // 4] = False
        keep[rows // 2:, :columns // 4] = False
        entry.gate.set_keep(keep)
    return model, masked


def grains(out: Path, rank: int) -> None:
    """The keep bits of each selection in GRAINS, chosen on the shards of a tiny Llama sharded per layer."""
    mesh = init_device_mesh("cpu", (2,))
    found = {}
    for name, options, selector, target, rounded in GRAINS:
        model, masked = masked_llama(options, rounded)
        shard_with_weights(masked)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        masked = masked_tensors(model)
        with across_shards():
            pruned = selector(local_entries(masked), target).pruned
        found[name] = (pruned, {entry.name: entry.gate.keep.full_tensor() for entry in masked})
    if rank == 0:
        torch.save(found, out / "grains.pt")


class LateLayer(TinyLlamaModule):
    """Built in ``__init__``, with one more layer added in configure_model (masked by the one line when ``line``)."""

    def __init__(self, line: bool) -> None:
        super().__init__()
        self.line = line

    def configure_model(self) -> None:
        self.model.late = torch.nn.Linear(32, 32, bias=False)
        if self.line:
            mask_before_sharding(self)
        super().configure_model()


def late_layers(out: Path, rank: int) -> None:
    """One step of each LateLayer: the layer left dense with a warning naming it, or masked by the line."""
    for line in (False, True):
        pruner = MaskPruningCallback(fold_on_fit_end=False, logging=MaskLogging(plots=False))
        trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=1, callbacks=[pruner],
                             strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                             logger=False, enable_progress_bar=False, enable_checkpointing=False)
        module = LateLayer(line)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module)
        if rank == 0:
            masked = [entry.name for entry in masked_tensors(module)]
            (out / f"late-{line}.txt").write_text("\n".join([*masked, *(str(w.message) for w in caught)]))


class Unmasked(TinyLlamaModule):
    """Builds and shards its layers in configure_model without the line that masks them first."""

    def configure_model(self) -> None:
        self.model = tiny_llama()
        super().configure_model()


def refused(out: Path, rank: int) -> None:
    """The error a fit gives whose configure_model shards layers the masks could not attach to first (last: on an
    error Lightning ends the other processes)."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=1, callbacks=[MaskPruningCallback()],
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         logger=False, enable_progress_bar=False, enable_checkpointing=False)
    try:
        trainer.fit(Unmasked(build_in_configure_model=True))
    except ValueError as error:
        if rank == 0:
            (out / "refused.txt").write_text(str(error))


def main(out: Path) -> None:
    first = out / "distributed"
    trainer, module, pruner = fit(first, distributed=True, extra=[Record(first)])
    folded_outputs(trainer, module, pruner, first)
    resumed = out / "distributed-resumed"
    fit(resumed, distributed=True, ckpt_path=first / "epoch=1.ckpt", extra=[Record(resumed)])
    # full (rank-0) checkpoints, a fit ending before its ramp (early_end="final" jumps to the target), its resume;
    # the layers built in configure_model; the keep bits held apart from the scores (a sharded bool parameter)
    full = out / "full"
    options = dict(distributed=False, early_end="final", build_in_configure_model=True, state=MaskState(compact=False))
    fit(full, **options, extra=[StopAfter(1), Record(full)])
    full_resumed = out / "full-resumed"
    trainer, _, _ = fit(full_resumed, **options, ckpt_path=full / "epoch=0.ckpt",
                        extra=[StopAfter(1), Record(full_resumed)])
    grains(out, trainer.global_rank)
    late_layers(out, trainer.global_rank)
    refused(out, trainer.global_rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
