"""Shrink and the export command on transformers models: the shrunk model matches the input, and what cannot be removed
(attention widths, key/value caches, transformers' Conv1D, rotary embeddings) is kept and listed in the report."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import TokenModule, make_trainer

from lightning_masks import MaskLogging, MaskPruningCallback, Schedule, Selector, fold_checkpoint
from lightning_masks.export.command import main
from lightning_masks.export.shrink import output_tensors, shrink


def channel_pruned(arch: str, **callback) -> tuple[TokenModule, pl.Trainer]:
    """A TokenModule fine-pruned for two batches with channel masks (folded unless told otherwise)."""
    pl.seed_everything(0, verbose=False)
    module = TokenModule(arch)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[
        MaskPruningCallback(0.5, selector=Selector(granularity="channel"), schedule=Schedule(end=1),
                            logging=MaskLogging(plots=False), **callback)])
    trainer.fit(module)
    return module, trainer


def tokens(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 100, (batch, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_shrink_returns_a_model_that_matches_the_input_and_lists_what_it_kept(arch):
    module, _ = channel_pruned(arch)
    model = module.model.eval()
    small, report = shrink(model, tokens(0))
    for seed in (0, 1):  # the example and unseen inputs, cache included
        with torch.no_grad():
            expected, got = output_tensors(model(tokens(seed))), output_tensors(small(tokens(seed)))
        assert len(got) == len(expected)
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    reasons = " | ".join(f"{name}: {why}" for name, why in report.skipped.items())
    if arch == "bert":
        assert report.params_after < report.params_before and report.removed
        assert "attention.self.query: " in reasons and "breaks the forward" in reasons
    if arch == "gpt2":
        assert "(model): key/value cache" in reasons and "h.0.mlp.c_fc: " in reasons and "not of a Conv1D" in reasons
    if arch == "llama":
        assert report.removed and "(model): key/value cache" in reasons and "self_attn.q_proj: " in reasons
        assert "rotary" in reasons


def test_the_command_shrinks_a_token_model_from_token_id_inputs(tmp_path, capsys):
    _, trainer = channel_pruned("bert", fold_on_fit_end=False)
    checkpoint = tmp_path / "bert.ckpt"
    trainer.save_checkpoint(checkpoint)
    output = tmp_path / "bert.safetensors"
    main([str(checkpoint), "-o", str(output), "--shrink", "--module-class", "helpers:TokenModule",
          "--input-shape", "4,16", "--input-dtype", "long"])
    printed = capsys.readouterr().out
    assert "channels removed" in printed and "kept model.bert.encoder.layer.0.attention.self.query" in printed
    plain = TokenModule.load_from_checkpoint(fold_checkpoint(checkpoint, tmp_path / "plain.ckpt")).eval()
    program = torch.export.load(output.with_suffix(".pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(tokens(2, batch=3)), plain(tokens(2, batch=3)), rtol=1e-4, atol=1e-5)


def test_the_command_refuses_float_noise_for_a_token_model_before_writing_anything(tmp_path, capsys):
    _, trainer = channel_pruned("bert", fold_on_fit_end=False)
    checkpoint = tmp_path / "bert.ckpt"
    trainer.save_checkpoint(checkpoint)
    output = tmp_path / "bert.safetensors"
    with pytest.raises(SystemExit) as exit_:
        main([str(checkpoint), "-o", str(output), "--shrink", "--module-class", "helpers:TokenModule",
              "--input-shape", "4,16"])
    assert exit_.value.code == 2
    assert "--input-dtype long" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [checkpoint]
