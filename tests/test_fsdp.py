"""FSDP2 through ModelParallelStrategy on two CPU processes (gloo): the sharded masks choose the keep bits one
process chooses on the same tensors, resume exactly, hold half the mask state a rank, log global counts, fold and
export; layers sharded before masking, tensor parallelism and inits from the inputs are refused. One run of
tests/fsdp_run.py serves every check."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_masks import MaskPruningCallback
from lightning_masks.lightning.trainer import check_strategy

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_run import CHECKS, GRAINS, TinyLlamaModule, masked_llama  # noqa: E402

SCRIPT = Path(__file__).with_name("fsdp_run.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def record(run, name, rank=0):
    return torch.load(run / name / f"record-rank{rank}.pt")


def unsharded(state: dict):
    """One process's masked tiny Llama holding the gathered tensors of ``state``, by masked tensor name."""
    _, masked = masked_llama({}, rounded=False)
    entries = {"model." + entry.name: entry for entry in masked}
    assert set(entries) == set(state)
    with torch.no_grad():
        for name, tensors in state.items():
            entry = entries[name]
            entry.weight.copy_(tensors["weight"])
            entry.gate.scores.copy_(tensors["scores"])
            entry.gate.set_keep(tensors["keep"])
            entry.gate.gate_scale.copy_(tensors["gate_scale"])
    return masked, entries


def assert_same_keep(entries, keeps):
    for name, keep in keeps.items():
        assert torch.equal(entries[name].gate.keep, keep), name


@pytest.mark.slow
def test_selection_across_shards_equals_one_process(run):
    state = record(run, "distributed")
    masked, entries = unsharded(state["state"])
    assert_same_keep(entries, {name: tensors["keep"] for name, tensors in state["state"].items()})
    results = {}
    for name, selector, target in CHECKS:
        masked, entries = unsharded(state["state"])
        pruned, keeps = state["checks"][name]
        select = selector.threshold if name == "threshold" else selector
        assert select(masked, target).pruned == pruned, name
        assert_same_keep(entries, keeps)
        results[name] = keeps
    assert any(not torch.equal(results["floor"][n], results["global"][n]) for n in results["global"])  # floor binds


@pytest.mark.slow
def test_channel_nm_and_ties_across_shards_equal_one_process(run):
    found = torch.load(run / "grains.pt")
    for name, options, selector, target, rounded in GRAINS:
        _, masked = masked_llama(options, rounded)
        assert selector(masked, target).pruned == found[name][0], name
        assert_same_keep({entry.name: entry for entry in masked}, found[name][1])
        if options.get("per_channel"):  # whole channels: each kept row entirely kept or pruned
            assert all(keep.shape[1] == 1 for keep in found[name][1].values())


@pytest.mark.slow
def test_resume_is_exact_from_distributed_and_full_checkpoints(run):
    for first, resumed in (("distributed", "distributed-resumed"), ("full", "full-resumed")):
        a, b = record(run, first)["state"], record(run, resumed)["state"]
        for name in a:
            for key in ("keep", "scores", "weight"):
                assert torch.equal(a[name][key], b[name][key]), (first, name, key)
        ends = [torch.load(run / folder / f"end-rank{rank}.pt") for folder in (first, resumed) for rank in (0, 1)]
        assert all(end == ends[0] for end in ends)


@pytest.mark.slow
def test_each_rank_holds_half_the_mask_state_and_its_optimizer_state(run):
    ranks = [record(run, "distributed", rank) for rank in (0, 1)]
    whole = ranks[0]["whole_bytes"]
    for rank in ranks:
        assert 0.45 * whole < rank["bytes"] < 0.55 * whole, (rank["bytes"], whole)
    assert sum(rank["bytes"] for rank in ranks) < 1.01 * whole  # only the 0-dim temperatures and scales are whole
    for rank in ranks:  # the scores' optimizer state (AdamW's moments) is sharded alike
        assert rank["optimizer_bytes"] * 2 == rank["whole_optimizer_bytes"] > 0


@pytest.mark.slow
def test_logs_global_counts_and_early_end_reaches_target(run):
    state = record(run, "distributed")["state"]
    total = sum(tensors["keep"].numel() for tensors in state.values())
    kept = sum(int(tensors["keep"].sum()) for tensors in state.values())
    with open(next(run.glob("distributed/logs/version_*/metrics.csv"))) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("masks/global/kept")]
    assert len({row["step"] for row in rows}) == len(rows)  # each step logged once
    assert float(rows[-1]["masks/global/kept"]) == kept  # all ranks' shards, not rank zero's half
    assert float(rows[-1]["masks/global/sparsity"]) == pytest.approx(1 - kept / total)
    end = torch.load(run / "full" / "end-rank0.pt")  # stopped after epoch 1 of a ramp ending at epoch 2
    assert end["pruned"] == round(0.8 * total) and end["masked"] == 0


@pytest.mark.slow
def test_fold_into_sharded_weights_and_export_from_rank_zero(run):
    state = record(run, "distributed")["state"]
    export = torch.load(run / "distributed" / "export.pt")
    assert export["masked"] == 0 and not any("parametrizations" in key for key in export["state"])
    for name, tensors in state.items():
        gate = torch.sigmoid(tensors["scores"].float()) * tensors["gate_scale"]
        expected = torch.where(tensors["keep"], tensors["weight"] * gate, torch.zeros(()))
        assert torch.allclose(export["state"][name], expected, atol=1e-6), name
        assert torch.equal(export["state"][name] == 0, ~tensors["keep"]), name
    plain = TinyLlamaModule()  # the exported model in one process computes what the folded sharded one did
    plain.load_state_dict(export["state"])
    with torch.no_grad():
        assert torch.allclose(plain(export["tokens"]), export["logits"], atol=1e-5)


@pytest.mark.slow
def test_layers_sharded_before_masking_are_refused_naming_the_line(run):
    message = (run / "refused.txt").read_text()
    assert "lightning_masks.mask_before_sharding(self)" in message and "the first fully_shard" in message


@pytest.mark.slow
def test_layers_built_after_masking_are_named_or_masked_by_the_line(run):
    left = (run / "late-False.txt").read_text()
    assert "built in configure_model are left dense: model.late.weight" in left and "mask_before_sharding" in left
    assert "model.late.weight" not in left.splitlines()  # not among the masked tensors
    masked = (run / "late-True.txt").read_text()
    assert "model.late.weight" in masked.splitlines() and "left dense: model.late" not in masked


def test_tensor_parallelism_is_refused_naming_what_works():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*tensor_parallel_size=1"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size='auto'"):
        check_strategy(ModelParallelStrategy())
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


def test_an_init_from_the_inputs_is_refused_naming_what_works():
    """Wanda calibrates on training batches, which run only once the weights are sharded: refused at setup (before
    it crashed at the first multiply of a plain input norm with a sharded weight)."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=2, logger=False,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    callback = MaskPruningCallback(0.5, init="wanda")
    with pytest.raises(ValueError, match=r"under ModelParallelStrategy.*init='magnitude'.*init='from_zeros'"):
        callback.setup(trainer, TinyLlamaModule(), "fit")


SHARD_LAYOUT = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers.pytorch_utils import Conv1D
from lightning_masks import Selector, attach, masked_tensors
from lightning_masks.lightning.sharding import check_shard_layout
from lightning_masks.masking import shard_with_weights
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
net = torch.nn.Sequential(torch.nn.Linear(8, 8), Conv1D(8, 8), torch.nn.LayerNorm(8))
shard_with_weights(attach(net, [torch.nn.Linear, Conv1D, "2.weight"]))
fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
for mode in ("layer", "row"):
    try:
        check_shard_layout(masked_tensors(net), Selector(mode=mode))
        print(mode, "ok")
    except ValueError as error:
        print(mode, "refused:", error)
dist.destroy_process_group()
"""


def test_row_selection_under_fsdp2_is_refused_where_a_shard_splits_rows(tmp_path):
    """mode='row' ranks each output unit's weights: a dim-0 shard splits the rows of a Conv1D (outputs on dim 1)
    and a 1-D tensor (one row), so each process would rank part of a row as if it were the whole."""
    result = subprocess.run([sys.executable, "-c", SHARD_LAYOUT, str(tmp_path / "store")], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer ok" in result.stdout
    assert "row refused: mode='row' under FSDP2 needs whole output units on each shard" in result.stdout
    assert "*.weight (x2) hold theirs on dim 1 or are 1-D" in result.stdout  # the Conv1D and the LayerNorm's
