"""Every way a user saves a model during a masked fit gives a model the plain architecture loads, with the masks as
they were; tuners and evaluation before fit leave the model as they found it."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import safetensors.torch
import torch
from helpers import TinyModule, make_trainer, synthetic_loader
from lightning.pytorch.tuner import Tuner
from test_real_models import HFModule, bert, gpt2
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_masks import MaskLogging, MaskPruningCallback, Schedule, folded_state, masked_tensors, plain_state_dict


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=0))


class Snapshots(HFModule):
    """A transformers model fine-tuned in Lightning that saves itself as each epoch ends, three ways, and records
    its outputs then (the masks as they are at that moment)."""

    def __init__(self, model: nn.Module, folder, labels: str = "lm") -> None:
        super().__init__(model, labels)
        self.folder = folder
        self.probe = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
        self.expected: list[torch.Tensor] = []

    def on_train_epoch_end(self):
        epoch = self.folder / f"epoch{self.current_epoch}"
        self.model.save_pretrained(epoch / "pretrained")  # as the user writes it: no call of ours
        torch.save(plain_state_dict(self.model), epoch / "weights.pt")
        with folded_state(self.model):
            safetensors.torch.save_model(self.model, str(epoch / "model.safetensors"))
        with torch.no_grad():
            self.model.eval()
            self.expected.append(self.model(input_ids=self.probe).logits.clone())
            self.model.train()


@pytest.mark.parametrize("build, labels", [(gpt2, "lm"), (bert, "class"), (llama, "lm")])
def test_snapshots_saved_during_fit_load_into_the_plain_architecture_with_the_masks_applied(build, labels, tmp_path):
    module = Snapshots(build(), tmp_path, labels)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(max_epochs=2, limit_train_batches=2,
                           callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=1),
                                                          logging=MaskLogging(plots=False))])
    trainer.fit(module)
    for epoch, expected in enumerate(module.expected):
        folder = tmp_path / f"epoch{epoch}"
        pretrained, info = type(module.model).from_pretrained(folder / "pretrained", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        from_torch, from_safetensors = build(), build()
        from_torch.load_state_dict(torch.load(folder / "weights.pt"), strict=True)
        missing, unexpected = safetensors.torch.load_model(from_safetensors, str(folder / "model.safetensors"))
        assert not missing and not unexpected
        for loaded in (pretrained, from_torch, from_safetensors):
            with torch.no_grad():
                torch.testing.assert_close(loaded.eval()(input_ids=module.probe).logits, expected, rtol=0, atol=0)
    zeros = [m.weight.eq(0).float().mean().item() for m in pretrained.modules() if hasattr(m, "weight")]
    assert max(zeros) > 0.3  # the snapshot holds the pruned weights, not the dense ones


def test_plain_view_leaves_the_checkpoint_and_the_model_masked(tmp_path):
    module = TinyModule()
    trainer = make_trainer(max_epochs=1, callbacks=[MaskPruningCallback(0.5, fold_on_fit_end=False,
                                                                        schedule=Schedule(end=1),
                                                                        logging=MaskLogging(plots=False))])
    trainer.fit(module)
    plain = plain_state_dict(module)
    assert sorted(plain) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    trainer.save_checkpoint(tmp_path / "masked.ckpt")
    keys = torch.load(tmp_path / "masked.ckpt", weights_only=True)["state_dict"]
    assert "net.0.parametrizations.weight.0.scores" in keys and "net.0.weight" not in keys
    assert masked_tensors(module) and torch.equal(plain["net.0.weight"], module.net[0].weight)


def test_copies_and_pickles_of_a_masked_transformers_model_save_their_own_plain_weights(tmp_path):
    module = HFModule(gpt2())
    make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[
        MaskPruningCallback(0.5, fold_on_fit_end=False, schedule=Schedule(end=1),
                            logging=MaskLogging(plots=False))]).fit(module)
    torch.save(module, tmp_path / "whole.pt")
    copies = {"deepcopy": copy.deepcopy(module), "pickle": torch.load(tmp_path / "whole.pt", weights_only=False)}
    probe = torch.randint(0, 100, (2, 8))
    for name, twin in copies.items():
        with torch.no_grad():
            twin.model.transformer.h[0].mlp.c_fc.parametrizations.weight.original.mul_(2.0)  # the twin differs
            expected = twin.model.eval()(input_ids=probe).logits
        twin.model.save_pretrained(tmp_path / name)
        loaded = type(twin.model).from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=probe).logits, expected, rtol=0, atol=0)


def test_a_lora_adapter_saved_during_fit_loads_with_peft_with_the_masks_applied(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    pl.seed_everything(0, verbose=False)
    adapted = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    module = Snapshots(adapted, tmp_path)  # its save_pretrained writes the adapter only
    # the adapters' factors named: by default the frozen base is masked, which an adapter-only save does not hold
    make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[
        MaskPruningCallback(0.5, targets=["*.lora_A.default", "*.lora_B.default"], schedule=Schedule(end=1),
                            logging=MaskLogging(plots=False))]).fit(module)
    loaded = PeftModel.from_pretrained(gpt2(), tmp_path / "epoch0" / "pretrained").eval()
    lora = [m.weight for name, m in loaded.named_modules() if name.endswith("lora_A.default")]
    assert lora and all(w.eq(0).any() for w in lora)  # the masks reached the adapter
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=module.probe).logits, module.expected[0], rtol=0, atol=0)


def snapshot(model: nn.Module) -> tuple:
    """Everything a tuner or an evaluation could leave changed: module classes, state, hooks, instance attributes."""
    structure = [(name, type(m), sorted(vars(m)), len(m._forward_pre_hooks), len(m._state_dict_hooks),
                  len(m._load_state_dict_pre_hooks)) for name, m in model.named_modules()]
    return structure, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(before: tuple, model: nn.Module) -> None:
    structure, state = snapshot(model)
    assert structure == before[0]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)


class BatchSized(TinyModule):
    """TinyModule with the ``batch_size`` attribute that ``Tuner.scale_batch_size`` tunes."""

    def __init__(self) -> None:
        super().__init__(hidden=32)
        self.batch_size = 4

    def train_dataloader(self):
        return synthetic_loader(n=64, batch_size=self.batch_size)


@pytest.mark.parametrize("tune", [lambda tuner, m: tuner.lr_find(m, num_training=8),
                                  lambda tuner, m: tuner.scale_batch_size(m, max_trials=2, steps_per_trial=2)],
                         ids=["lr_find", "scale_batch_size"])
def test_a_tuner_leaves_the_weights_exactly_as_they_were_and_the_fit_after_it_prunes(tune):
    pl.seed_everything(0, verbose=False)
    module = BatchSized()
    before = snapshot(module)
    trainer = make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(0.8, logging=MaskLogging(plots=False))])
    tune(Tuner(trainer), module)
    assert_unchanged(before, module)
    trainer.fit(module)
    assert not masked_tensors(module)
    weights = torch.cat([module.net[0].weight.flatten(), module.net[2].weight.flatten()])
    assert float(weights.eq(0).float().mean()) == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_before_fit_leaves_the_model_untouched(stage):
    module = TinyModule()
    before = snapshot(module)
    trainer = make_trainer(max_epochs=1, callbacks=[MaskPruningCallback(0.5, schedule=Schedule(end=1),
                                                                        logging=MaskLogging(plots=False))])
    getattr(trainer, stage)(module)
    assert_unchanged(before, module)
    trainer.fit(module)
    assert module.net[0].weight.eq(0).any()
