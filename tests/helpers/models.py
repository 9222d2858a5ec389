"""Shared tiny models and a quiet Trainer factory (import them from ``helpers``)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TiedLM", "TinyModule", "TokenModule", "make_trainer", "synthetic_loader"]


def make_trainer(**kwargs) -> pl.Trainer:
    """A Trainer with no output: no logger, progress bar, summary or checkpoints unless asked."""
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1)
    options.update(kwargs)
    return pl.Trainer(**options)


def synthetic_loader(n: int = 64, features: int = 8, classes: int = 3, batch_size: int = 16, seed: int = 0):
    """A small classification data set: labels from a fixed random linear map of Gaussian inputs."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    labels = (inputs @ torch.randn(features, classes, generator=generator)).argmax(1)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size)


class TinyModule(pl.LightningModule):
    """A plain two-layer classifier on synthetic data: what a user would write."""

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def train_dataloader(self):
        return synthetic_loader(features=self.hparams.features, classes=self.hparams.classes)

    def val_dataloader(self):
        return synthetic_loader(features=self.hparams.features, classes=self.hparams.classes, seed=1)

    test_dataloader = val_dataloader

    def predict_dataloader(self):
        return synthetic_loader(features=self.hparams.features, classes=self.hparams.classes, seed=1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TiedLM(nn.Module):
    """An embedding tied to the output layer, 10x larger in scale than the hidden Linear layers."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():
            self.embed.weight.mul_(10.0 / self.embed.weight.abs().mean())
            for layer in (self.hidden[0], self.hidden[2]):
                layer.weight.mul_(1.0 / layer.weight.abs().mean())

    def forward(self, tokens):
        return self.head(self.hidden(self.embed(tokens)))


class TokenModule(pl.LightningModule):
    """A tiny transformers model (``arch``: ``"bert"`` classifies, ``"gpt2"`` and ``"llama"`` model language) on
    random token ids, built from its config as a user's module builds it, so that ``load_from_checkpoint`` works."""

    def __init__(self, arch: str = "bert", vocab: int = 100, length: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        import transformers

        torch.manual_seed(0)
        if arch == "bert":
            self.model = transformers.BertForSequenceClassification(transformers.BertConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=vocab,
                num_labels=2, max_position_embeddings=length, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0))
        elif arch == "gpt2":
            self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=length, bos_token_id=0,
                eos_token_id=0))
        else:
            self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=length, pad_token_id=0, bos_token_id=0,
                eos_token_id=0))

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        labels = tokens[:, 0] % 2 if self.hparams.arch == "bert" else tokens
        return self.model(input_ids=tokens, labels=labels).loss

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.hparams.vocab, (32, self.hparams.length), generator=generator)
        return DataLoader(TensorDataset(tokens), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)
