"""End to end: train with channel masks and ModelCheckpoint, export the checkpoint with the command, load the
outputs in a plain interpreter that never imports lightning_masks."""

from __future__ import annotations

import re
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_export import readme_loader

from lightning_masks import MaskLogging, MaskPruningCallback, Schedule, Selector, fold_checkpoint
from lightning_masks.export.command import main


def test_channel_checkpoint_exports_to_smaller_files_that_plain_pytorch_runs(tmp_path, capsys):
    pl.seed_everything(0, verbose=False)
    pruner = MaskPruningCallback(0.75, selector=Selector(granularity="channel"), exclude=["net.2"],
                                 schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=True,
                           callbacks=[pruner, saver])
    trainer.fit(TinyModule(hidden=32))
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    assert "net.0.parametrizations.weight.0.scores" in torch.load(checkpoint, weights_only=False)["state_dict"]

    output = tmp_path / "export" / "tiny.safetensors"
    main([str(checkpoint), "-o", str(output), "--shrink", "--module-class", "helpers:TinyModule",
          "--input-shape", "16,8"])
    assert "24 channels removed" in capsys.readouterr().out  # 75% of the 32 hidden channels

    folded = TinyModule.load_from_checkpoint(fold_checkpoint(checkpoint, tmp_path / "plain.ckpt")).eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save({"x": x, "y": folded(x), "params": sum(p.numel() for p in folded.parameters())},
                   tmp_path / "io.pt")
    code = readme_loader() + f"""
import sys
from torch import nn
io = torch.load({str(tmp_path / 'io.pt')!r})
state = {{k.removeprefix("net."): v for k, v in load_sparse({str(output)!r}).items()}}
dense = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
dense.load_state_dict(state)
small = torch.export.load({str(output.with_suffix('.pt2'))!r}).module()
with torch.no_grad():
    torch.testing.assert_close(dense(io["x"]), io["y"], rtol=0, atol=0)
    torch.testing.assert_close(small(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
small_params = sum(p.numel() for p in small.parameters())
assert small_params < io["params"], (small_params, io["params"])
assert not any(m.startswith("lightning_masks") for m in sys.modules), "imported lightning_masks"
print("params", small_params, io["params"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    small_params, dense_params = map(int, re.search(r"params (\d+) (\d+)", done.stdout).groups())
    assert small_params == 8 * 8 + 8 + 8 * 3 + 3 < dense_params == 8 * 32 + 32 + 32 * 3 + 3


@pytest.mark.parametrize("auto", [False, True])
def test_tied_stream_masks_let_shrink_narrow_a_resnets_residual_streams(auto):
    from lightning_masks.export.shrink import shrink
    from lightning_masks.selection import coupled_channels
    from lightning_masks.zoo.data import SyntheticDataModule
    from lightning_masks.zoo.models import ResNet20

    pl.seed_everything(0, verbose=False)
    model = ResNet20(in_channels=1, num_classes=3, width=4, blocks=2, shortcut="projection")
    streams = coupled_channels(model, torch.randn(2, 1, 8, 8))
    assert [len(s) for s in streams] == [3, 3, 3]  # stem BN + two blocks; then shortcut BN + two blocks
    if auto:  # the callback finds the same groups itself, on the module's example_input_array
        model.example_input_array = torch.randn(2, 1, 8, 8)
        norms = ["net.1.weight", "*.body.1.weight", "*.body.4.weight", "*.shortcut.1.weight"]
        pruner = MaskPruningCallback(0.5, selector=Selector(granularity="channel", mode="layer", tie="auto"),
                                     targets=norms, schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    else:
        pruner = MaskPruningCallback(0.5, selector=Selector(granularity="channel", mode="layer", tie=streams),
                                     targets=[*sum(streams, []),
                                     "net.*.body.1.weight"],
                                     schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    data = SyntheticDataModule(64, (1, 8, 8), 3, batch_size=16)
    make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[pruner]).fit(model, data)
    net = model.net.eval()
    for stream in streams:  # one keep per stage: every BN writing the stream has the same zero channels
        zero = [(net.get_submodule(name.removeprefix("net.").removesuffix(".weight")).weight == 0) for name in stream]
        assert all(torch.equal(z, zero[0]) for z in zero) and int(zero[0].sum()) == len(zero[0]) // 2
    x = torch.randn(4, 1, 8, 8)
    small, report = shrink(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)
    # the streams went from 4/8/16 channels to 2/4/8: stem conv, shortcut convs and the classifier read them
    assert small[0].out_channels == 2 and small[-1].in_features == 8
    assert [small[i].shortcut[0].out_channels for i in (5, 7)] == [4, 8]
    assert report.params_after < report.params_before / 3
    assert pruner.selector.tie == tuple(map(tuple, streams))  # with "auto", resolved to the same traced groups
