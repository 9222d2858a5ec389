"""Real model code, unmodified: transformers models from tiny configs, recurrent, transposed and grouped layers,
layers built in configure_model. What gets masked is what the user means, and the model's outputs survive."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, prune, zeros_and_total
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.pytorch_utils import Conv1D

from lightning_masks import (
    MaskLogging,
    MaskPruningCallback,
    Schedule,
    Selector,
    attach,
    fold,
    get_layer_kind,
    list_layer_kinds,
    masked_tensors,
    register_layer_kind,
)
from lightning_masks.masking import kind_of, resolve_targets

VOCAB = 100


def token_loader(n: int = 32, length: int = 8, batch_size: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, length), generator=generator)), batch_size=batch_size)


class HFModule(pl.LightningModule):
    """A transformers model in a LightningModule, as a user writes it: the model's own loss on token batches."""

    def __init__(self, model: nn.Module, labels: str = "lm") -> None:
        super().__init__()
        self.model = model
        self.labels = labels

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        if self.labels == "class":
            return self.model(input_ids=tokens, labels=tokens[:, 0] % 2).loss
        return self.model(input_ids=tokens, labels=tokens).loss

    def train_dataloader(self):
        return token_loader()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=VOCAB, num_labels=2,
                                                    max_position_embeddings=16))


def t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                               eos_token_id=1))


def bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                   max_position_embeddings=16, pad_token_id=1, bos_token_id=0,
                                                   eos_token_id=2, decoder_start_token_id=2))


def embedding_params(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def fit(module: pl.LightningModule, *callbacks, **options) -> pl.Trainer:
    options.setdefault("max_epochs", 2)
    trainer = make_trainer(callbacks=list(callbacks), **options)
    trainer.fit(module)
    return trainer


# ----------------------------------------------------------------------------------------- layer kinds
def test_every_required_layer_kind_is_registered_with_its_output_axis():
    expected = {nn.Linear: 0, nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0, nn.ConvTranspose1d: 1,
                nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1, nn.MultiheadAttention: 0, nn.RNN: 0, nn.LSTM: 0,
                nn.GRU: 0, Conv1D: 1}
    for layer, axis in expected.items():
        assert get_layer_kind(layer).output_axis == axis, layer
    assert "transformers.pytorch_utils.Conv1D" in list_layer_kinds()
    lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    assert sorted(kind_of(lstm).tensor_names(lstm)) == sorted(n for n, _ in lstm.named_parameters() if "weight" in n)


def test_a_lookup_miss_names_the_registered_kinds_and_a_duplicate_is_refused():
    with pytest.raises(ValueError, match=r"no layer kind registered for 'torch.nn.modules.sparse.Embedding'.*Linear"):
        get_layer_kind(nn.Embedding)
    with pytest.raises(ValueError, match="registered already; pass override=True"):
        register_layer_kind(nn.Linear)
    with pytest.raises(ValueError, match="output_axis must be an int >= 0"):
        register_layer_kind("some.Layer", output_axis=-1)


def test_a_registered_user_layer_is_masked_by_default_along_its_output_axis():
    class Transposed(nn.Module):  # y = x @ w, with w of shape (in, out), like transformers' Conv1D
        def __init__(self, features: int, out: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(features, out))

        def forward(self, x):
            return x @ self.w

    model = nn.Sequential(Transposed(6, 4), nn.ReLU(), nn.Linear(4, 2))
    assert [e.name for e in attach(model)] == ["2.weight"]  # no kind yet: left dense
    fold(model)
    register_layer_kind(Transposed, tensors=("w",), output_axis=1)
    masked = attach(model, per_channel=True)
    assert [(e.name, tuple(e.gate.scores.shape)) for e in masked] == [("0.w", (1, 4)), ("2.weight", (2, 1))]


class OwnConv1D(nn.Module):
    """A user's copy of GPT-2's Conv1D: ``y = x @ weight + bias`` with ``weight`` stored ``(in, out)``."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.out_features)


class OwnConv1DModule(TinyModule):
    """TinyModule whose hidden layer is the user's Conv1D copy."""

    def __init__(self) -> None:
        super().__init__(hidden=16)
        self.net[0] = OwnConv1D(16, 8)


@pytest.mark.parametrize("granularity", ["channel", "2:4"])
def test_structured_masks_on_a_layer_of_no_registered_kind_are_refused_before_any_step(granularity):
    module = OwnConv1DModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    pruner = MaskPruningCallback(selector=Selector(granularity=granularity), targets=[OwnConv1D, nn.Linear],
                                 schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    with pytest.raises(ValueError, match=rf"granularity='{granularity}' needs to know which axis of 'net.0.weight'.*"
                                         r"not a registered layer kind.*register_layer_kind\(OwnConv1D, output_axis"):
        fit(module, pruner, limit_train_batches=2)
    assert not masked_tensors(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_element_masks_on_a_layer_of_no_registered_kind_still_work():
    pl.seed_everything(0, verbose=False)
    module = OwnConv1DModule()
    fit(module, MaskPruningCallback(0.5, targets=[OwnConv1D, nn.Linear], schedule=Schedule(end=1),
                                    logging=MaskLogging(plots=False)), limit_train_batches=2)
    zeros = int(module.net[0].weight.eq(0).sum())
    assert zeros == pytest.approx(0.5 * module.net[0].weight.numel(), abs=0.15 * module.net[0].weight.numel())


def test_a_layer_registered_with_its_axis_gets_channel_masks_on_its_outputs():
    pl.seed_everything(0, verbose=False)
    register_layer_kind(OwnConv1D, output_axis=1)
    module = OwnConv1DModule()
    fit(module, MaskPruningCallback(0.5, selector=Selector(granularity="channel"), schedule=Schedule(end=1),
                                    logging=MaskLogging(plots=False)), limit_train_batches=2)
    weight, bias = module.net[0].weight, module.net[0].bias
    dead = weight.eq(0).all(0)  # whole output columns
    assert 0 < int(dead.sum()) < weight.shape[1] and not weight.eq(0).all(1).any()
    assert bias[dead].eq(0).all() and bias[~dead].ne(0).all()


# ----------------------------------------------------------------------------------------- transformers
def test_gpt2_masks_the_blocks_conv1d_weights_and_leaves_the_tied_embedding_whole(caplog, monkeypatch):
    module = HFModule(gpt2())
    pruner = MaskPruningCallback(0.5, schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    fit(module, pruner, limit_train_batches=2)
    line = next(r.getMessage() for r in caplog.records if "masking" in r.getMessage())
    assert "masking 8 tensors" in line and "model.transformer.wte.weight = model.lm_head.weight" in line
    assert "targets=[..., 'model.transformer.wte.weight']" in line
    assert module.model.transformer.wte.weight.ne(0).all()  # trained, never pruned
    assert module.model.lm_head.weight is module.model.transformer.wte.weight  # still tied after fold
    names = [f"model.transformer.h.{i}.{part}.weight" for i in range(2)
             for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    pruned, total = zeros_and_total(module, names)
    assert pruned == round(0.5 * total)
    generated = module.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_module_globs_select_any_registered_layer_and_exclude_removes_a_tie():
    model = gpt2()
    targets = ["transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_fc", "lm_head"]
    chosen = resolve_targets(model, targets).chosen
    assert list(chosen) == ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
                            "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight",
                            "transformer.h.1.mlp.c_fc.weight"]
    assert len(chosen["transformer.wte.weight"]) == 2  # one mask for the embedding and its tied head
    resolved = resolve_targets(model, targets, exclude=["transformer.wte"])
    assert "transformer.wte.weight" not in resolved.chosen and len(resolved.chosen) == 4
    assert resolved.excluded == ["transformer.wte.weight = lm_head.weight"]


def test_targets_that_select_nothing_say_so_and_name_what_was_left_out():
    with pytest.raises(ValueError, match=r"targets=\['transformer.wpe'\] select no.*frozen.*'transformer.wpe.weight'"):
        model = gpt2()
        model.transformer.wpe.weight.requires_grad_(False)
        attach(model, ["transformer.wpe"])


def test_a_glob_on_a_module_of_no_kind_selects_its_weights_whatever_its_type():
    model = gpt2()
    assert list(resolve_targets(model, ["transformer.h.0.ln_1"]).chosen) == ["transformer.h.0.ln_1.weight"]
    assert list(resolve_targets(model, [nn.Embedding]).chosen) == ["transformer.wte.weight", "transformer.wpe.weight"]


@pytest.mark.parametrize("build, expected, tied", [
    (bert, 14, []),  # 2 x (q, k, v, attention out, intermediate, output) + pooler + classifier
    (t5, 32, ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]),
    (bart, 16, ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                "lm_head.weight"]),
])
def test_encoder_and_seq2seq_models_mask_their_projections_and_keep_shared_embeddings(build, expected, tied):
    model = build()
    resolved = resolve_targets(model)
    assert len(resolved.chosen) == expected
    assert not {id(getattr(m, tn)) for owners in resolved.chosen.values() for m, tn in owners} & embedding_params(model)
    if tied:
        assert resolved.embeddings[0].split(" = ") == tied
    masked = attach(model)
    Selector()(masked, 0.7)
    total = sum(e.numel for e in masked)
    assert sum(int((~e.gate.keep).sum()) for e in masked) == round(0.7 * total)


def test_seq2seq_generate_works_after_a_masked_fit_and_fold():
    module = HFModule(t5())
    fit(module, MaskPruningCallback(0.6, schedule=Schedule(end=1), logging=MaskLogging(plots=False)),
        limit_train_batches=2)
    assert not any(parametrize.is_parametrized(m) for m in module.modules())
    out = module.model.generate(torch.tensor([[5, 6, 7, 1]]), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] <= 4


def test_gpt2_resume_from_a_mid_ramp_checkpoint_reaches_the_same_weights(tmp_path):
    def run(ckpt_path=None, max_epochs=3):
        pl.seed_everything(0, verbose=False)
        module = HFModule(gpt2())
        saver = ModelCheckpoint(dirpath=tmp_path, filename="e{epoch}", save_top_k=-1)
        trainer = make_trainer(max_epochs=max_epochs, limit_train_batches=2, enable_checkpointing=True,
                               callbacks=[MaskPruningCallback(0.5, schedule=Schedule(start=0, end=3),
                                                              logging=MaskLogging(plots=False)), saver])
        trainer.fit(module, ckpt_path=ckpt_path)
        return module

    whole = run()
    resumed = run(ckpt_path=tmp_path / "eepoch=0.ckpt")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------- channel masks
def test_channel_pruning_keeps_the_classifier_whole_so_every_class_keeps_its_logit():
    pl.seed_everything(0, verbose=False)
    module = TinyModule(hidden=32, classes=10)
    fit(module, MaskPruningCallback(0.8, selector=Selector(granularity="channel"), schedule=Schedule(end=1),
                                    logging=MaskLogging(plots=False)), limit_train_batches=2)
    head = module.net[2]
    assert head.weight.ne(0).any(1).all()  # every class row has live weights
    rows = module.net[0].weight.ne(0).any(1)
    assert int((~rows).sum()) >= 0.8 * 32 - 1  # the budget fell on the hidden layer
    logits = module(torch.randn(256, 8))
    assert logits.std(0).gt(0).all()


def test_output_layers_none_prunes_the_classifier_too():
    pl.seed_everything(0, verbose=False)
    module = TinyModule(hidden=32, classes=10)
    fit(module, MaskPruningCallback(0.8, selector=Selector(granularity="channel"), output_layers=None,
                                    schedule=Schedule(end=1), logging=MaskLogging(plots=False)),
        limit_train_batches=2)
    assert not module.net[2].weight.ne(0).any(1).all()


def test_channel_pruning_keeps_a_tied_lm_head_whole_when_types_select_it():
    module = HFModule(gpt2())
    module.example_input_array = torch.randint(0, VOCAB, (2, 8))
    pruner = MaskPruningCallback(0.5, selector=Selector(granularity="channel"), targets=[Conv1D, nn.Embedding],
                                 exclude=["model.transformer.wpe"], schedule=Schedule(end=1),
                                 logging=MaskLogging(plots=False))  # no layer kind says which axis is a channel
    fit(module, pruner, limit_train_batches=2)
    assert module.model.lm_head.weight.ne(0).any(1).all()  # the whole vocabulary survives
    assert module.model.transformer.h[0].mlp.c_fc.weight.eq(0).all(0).any()  # c_fc lost output channels


def test_an_output_layer_named_in_targets_is_channel_pruned_as_asked():
    pl.seed_everything(0, verbose=False)
    module = TinyModule(hidden=32, classes=10)
    fit(module, MaskPruningCallback(0.5, selector=Selector(granularity="channel"), targets=["net.0", "net.2"],
                                    schedule=Schedule(end=1), logging=MaskLogging(plots=False)),
        limit_train_batches=2)
    assert module.net[2].weight.eq(0).all(1).any()


def test_pattern_errors_name_the_argument_they_come_from(tiny_module):
    with pytest.raises(ValueError, match="exclude pattern 'nothing' matches no module"):
        attach(tiny_module, exclude=["nothing"])
    with pytest.raises(ValueError, match="output_layers pattern 'nope' matches no module"):
        fit(tiny_module, MaskPruningCallback(selector=Selector(granularity="channel"),
                                             output_layers=["nope"]), max_epochs=1)


@pytest.mark.parametrize("layer, weight, bias", [(nn.LSTM(8, 8), "weight_ih_l0", "bias_ih_l0"),
                                                 (nn.LSTM(8, 8), "weight_hh_l0", "bias_hh_l0"),
                                                 (nn.MultiheadAttention(8, 2), "in_proj_weight", "in_proj_bias")])
def test_channel_masks_zero_the_bias_that_goes_with_each_weight(layer, weight, bias):
    torch.manual_seed(0)
    nn.init.normal_(getattr(layer, bias))
    for entry in attach(layer, per_channel=True):
        prune(entry.gate, slice(None, entry.units // 2), flat=True)
    fold(layer)
    dead = getattr(layer, weight).eq(0).all(1)
    assert int(dead.sum()) == getattr(layer, weight).shape[0] // 2
    assert getattr(layer, bias)[dead].eq(0).all() and getattr(layer, bias)[~dead].ne(0).all()


@pytest.mark.parametrize("layer", [Conv1D(6, 6), nn.ConvTranspose2d(6, 6, 3), nn.ConvTranspose1d(4, 6, 3)])
def test_channel_masks_follow_the_output_axis_and_zero_that_channels_bias(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.bias.uniform_(0.5, 1.0)
    (entry,) = attach(layer, per_channel=True)
    prune(entry.gate, [1, 4], flat=True)
    fold(layer)
    axis = 1
    dead = layer.weight.movedim(axis, 0).flatten(1).eq(0).all(1)
    assert dead.nonzero().view(-1).tolist() == [1, 4]
    assert layer.bias.eq(0).nonzero().view(-1).tolist() == [1, 4]
    assert layer.weight.movedim(axis, 0).flatten(1).ne(0).any(1).sum() == layer.weight.shape[axis] - 2


def test_channel_masks_on_a_grouped_conv_transpose_are_refused_naming_the_layer():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"'0.weight', a ConvTranspose with groups=2.*exclude=\['0.weight'\]"):
        attach(model, per_channel=True)
    assert not parametrize.is_parametrized(model[0])


@pytest.mark.parametrize("layer, axis", [(Conv1D(8, 4), 1), (nn.Linear(8, 4), 0), (nn.ConvTranspose1d(8, 4, 2), 1)])
def test_nm_groups_run_along_each_output_units_inputs(layer, axis):
    (entry,) = attach(layer)
    Selector(granularity="2:4")([entry], 0.5)
    per_unit = entry.gate.keep.movedim(axis, 0).reshape(entry.gate.keep.shape[axis], -1, 4)
    assert per_unit.sum(-1).eq(2).all()


# ----------------------------------------------------------------------------------------- recurrent, vision
class RecurrentLM(pl.LightningModule):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = cell(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, VOCAB)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        return nn.functional.cross_entropy(self(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:])

    def train_dataloader(self):
        return token_loader()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_recurrent_weights_are_masked_per_gate_row_and_the_masked_forward_equals_the_folded(cell, granularity):
    pl.seed_everything(0, verbose=False)
    module = RecurrentLM(cell)
    pruner = MaskPruningCallback(0.5, selector=Selector(granularity=granularity), fold_on_fit_end=False,
                                 schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    fit(module, pruner, limit_train_batches=2)
    names = [e.name for e in masked_tensors(module)]
    assert names[:4] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"]
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        masked_out = module(tokens)
        fold(module)
        assert torch.allclose(module(tokens), masked_out, atol=1e-6)
    if granularity == "channel":
        assert module.rnn.weight_hh_l0.eq(0).all(1).any()  # whole gate rows removed
        assert module.head.weight.ne(0).any(1).all()  # the vocabulary is an output: kept whole


class Block(nn.Module):
    """ResNet-, MobileNet- and ConvNeXt-like pieces: grouped and depthwise convs, BatchNorm, LayerNorm, residuals."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.GroupNorm(1, channels)  # ConvNeXt's LayerNorm over channels
        self.expand = nn.Conv2d(channels, 2 * channels, 1)
        self.grouped = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(2 * channels)
        self.project = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x):
        h = self.norm(self.depthwise(x))
        return x + self.project(torch.relu(self.bn(self.grouped(torch.relu(self.expand(h))))))


class ConvAutoencoderClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.block = Block(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.decode = nn.ConvTranspose2d(4, 1, 3, padding=1)
        self.classify = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 5))
        self.example_input_array = torch.randn(2, 1, 8, 8)

    def forward(self, x):
        h = self.block(torch.relu(self.stem(x)))
        return self.decode(torch.relu(self.up(h))), self.classify(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        image, logits = self(x)
        return nn.functional.mse_loss(image, x) + nn.functional.cross_entropy(logits, y)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 1, 8, 8, generator=generator),
                                        torch.randint(0, 5, (16,), generator=generator)), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_vision_blocks_with_grouped_depthwise_and_transposed_convs_prune_exactly(granularity):
    pl.seed_everything(0, verbose=False)
    module = ConvAutoencoderClassifier()
    pruner = MaskPruningCallback(0.5, selector=Selector(granularity=granularity, mode="layer"), fold_on_fit_end=False,
                                 schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    fit(module, pruner, limit_train_batches=2)
    masked = {e.name: e for e in masked_tensors(module)}
    for entry in masked.values():
        assert int((~entry.gate.keep).sum()) == round(0.5 * entry.units), entry.name
    x = torch.randn(2, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        before = module(x)
        fold(module)
        after = module(x)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))
    if granularity == "channel":  # both outputs' layers are whole: the image channel and every class
        assert set(masked) == {"stem.weight", "block.depthwise.weight", "block.expand.weight",
                               "block.grouped.weight", "block.project.weight", "up.weight"}
        assert module.up.weight.eq(0).all(0).flatten(1).all(1).sum() == 2  # ConvTranspose: channels on dim 1


# ----------------------------------------------------------------------------------------- configure_model
class BuiltLate(TinyModule):
    """Builds the whole network, or only its head (``part=True``), in configure_model."""

    def __init__(self, part: bool = False) -> None:
        super().__init__()
        self.part = part
        self.net = None if not part else nn.Sequential(nn.Linear(8, 16), nn.ReLU())

    def configure_model(self):
        if self.part:
            self.head = nn.Linear(16, 3)
        elif self.net is None:
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.net(x)) if self.part else self.net(x)


@pytest.mark.parametrize("part", [False, True])
def test_layers_built_in_configure_model_are_masked_like_any_other(part):
    pl.seed_everything(0, verbose=False)
    module = BuiltLate(part)
    pruner = MaskPruningCallback(0.5, schedule=Schedule(end=1), logging=MaskLogging(plots=False))
    fit(module, pruner, max_epochs=2, limit_train_batches=2)
    layers = [module.net[0], module.head if part else module.net[2]]
    pruned = sum(int(layer.weight.eq(0).sum()) for layer in layers)
    assert pruned == round(0.5 * sum(layer.weight.numel() for layer in layers))
    assert "configure_model" not in vars(module)  # the wrapper is gone after fit


def test_a_module_built_in_setup_with_no_maskable_layer_gets_an_error_naming_the_fix():
    class Empty(TinyModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Identity())

        def forward(self, x):
            return x[:, :3] * self.scale

        def configure_model(self):
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="no maskable tensor found.*register_layer_kind"):
        fit(Empty(), MaskPruningCallback(), max_epochs=1)


def test_unmasked_weight_matrices_of_no_kind_get_a_warning_naming_them():
    class Custom(TinyModule):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return self.net(x @ self.mix)

    with pytest.warns(UserWarning, match=r"1 trainable weight matrices are left dense .no registered layer kind.: mix"):
        fit(Custom(), MaskPruningCallback(0.5, schedule=Schedule(end=1), logging=MaskLogging(plots=False)),
            max_epochs=1, limit_train_batches=1)


def test_no_left_dense_warning_when_targets_are_chosen_or_for_embedding_like_parameters(recwarn):
    class Vit(TinyModule):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.position_embeddings = nn.Parameter(torch.zeros(1, 4, 8))

        def forward(self, x):
            return self.net(x + self.cls_token[0, 0] + self.position_embeddings[0, 0])

    fit(Vit(), MaskPruningCallback(0.5, schedule=Schedule(end=1), logging=MaskLogging(plots=False)), max_epochs=1,
        limit_train_batches=1)
    fit(TinyModule(), MaskPruningCallback(0.5, targets=["net.0"], schedule=Schedule(end=1),
                                          logging=MaskLogging(plots=False)), max_epochs=1,
        limit_train_batches=1)
    assert not [w for w in recwarn if "left dense" in str(w.message)]


def test_automatic_ties_that_tie_nothing_say_why():
    module = ConvAutoencoderClassifier()
    with pytest.warns(UserWarning, match="tie='auto' tied nothing"):
        fit(module, MaskPruningCallback(0.5, selector=Selector(tie="auto"), schedule=Schedule(end=1),
                                        logging=MaskLogging(plots=False)), max_epochs=1, limit_train_batches=1)
