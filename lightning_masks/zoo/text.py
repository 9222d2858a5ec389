"""A causal language model on local text: the Python standard library's source, a byte-level BPE trained here, and a
tiny Llama (transformers, built from a config: nothing is downloaded). Needs ``transformers`` and ``tokenizers``."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["CausalLM", "PythonSourceDataModule", "python_sources", "tiny_llama"]


def python_sources(split: str, held_out_share: int = 10) -> list[Path]:
    """The standard library's ``.py`` files of one split, sorted: ``"held_out"`` (one path in ``held_out_share``, by
    the CRC-32 of the path relative to the library) or ``"train"`` (the rest). Installed packages are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    held = [zlib.crc32(str(p.relative_to(root)).encode()) % held_out_share == 0 for p in files]
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    return [p for p, h in zip(files, held) if h == (split == "held_out")]


def _read(files: list[Path], limit: Optional[int]) -> list[str]:
    texts, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text)
        if limit is not None and size >= limit:
            break
    return texts


class PythonSourceDataModule(pl.LightningDataModule):
    """Windows of ``seq_len + 1`` tokens of the standard library's source, train and held-out split by path.

    The byte-level BPE (``tokenizers``) is trained on the training files and saved in ``cache_dir`` with the token
    streams, so a second run reads them back.

    Args:
        cache_dir: where the tokenizer and token streams are kept.
        vocab_size: the BPE's vocabulary.
        seq_len: tokens a window predicts.
        batch_size: windows a batch.
        train_chars, held_out_chars: how much text each split reads (characters, whole files).
        eval_windows: the fixed held-out windows evaluated (non-overlapping, from the start of the stream).
    """

    def __init__(self, cache_dir: str = "python_source_cache", vocab_size: int = 2048, seq_len: int = 64,
                 batch_size: int = 16, train_chars: int = 4_000_000, held_out_chars: int = 400_000,
                 eval_windows: int = 256, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cache = Path(cache_dir)
        self.train: Optional[Tensor] = None
        self.held_out: Optional[Tensor] = None

    @property
    def tokenizer_dir(self) -> Path:
        """Where the BPE's ``vocab.json`` and ``merges.txt`` are kept (one folder per vocabulary and text size)."""
        return self.cache / f"bpe_{self.hparams['vocab_size']}_{self.hparams['train_chars']}"

    def tokenizer(self):
        """The BPE tokenizer (trained on first use)."""
        from tokenizers import ByteLevelBPETokenizer
        vocab, merges = self.tokenizer_dir / "vocab.json", self.tokenizer_dir / "merges.txt"
        if not vocab.exists():
            self.tokenizer_dir.mkdir(parents=True, exist_ok=True)
            tokenizer = ByteLevelBPETokenizer()
            tokenizer.train_from_iterator(_read(python_sources("train"), self.hparams["train_chars"]),
                                          vocab_size=self.hparams["vocab_size"], min_frequency=2)
            tokenizer.save_model(str(self.tokenizer_dir))
        return ByteLevelBPETokenizer(str(vocab), str(merges))

    def _stream(self, split: str, chars: int) -> Tensor:
        path = self.tokenizer_dir / f"{split}_{chars}.pt"
        if path.exists():
            return torch.load(path)
        tokenizer = self.tokenizer()
        ids = [i for text in _read(python_sources(split), chars) for i in tokenizer.encode(text).ids]
        stream = torch.tensor(ids, dtype=torch.int32)
        torch.save(stream, path)
        return stream

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train is None:
            self.train = self._stream("train", self.hparams["train_chars"])
            self.held_out = self._stream("held_out", self.hparams["held_out_chars"])

    def windows(self, stream: Tensor, count: Optional[int] = None, offset: int = 0) -> Tensor:
        """Non-overlapping windows of ``seq_len + 1`` tokens of ``stream`` from ``offset``."""
        size = self.hparams["seq_len"] + 1
        usable = (len(stream) - offset) // size
        return stream[offset:offset + size * min(usable, count or usable)].view(-1, size).long()

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None, "setup() loads the token streams"
        offset = int(torch.randint(0, self.hparams["seq_len"], (1,)))  # a new phase each epoch
        return DataLoader(TensorDataset(self.windows(self.train, offset=offset)),
                          batch_size=self.hparams["batch_size"], shuffle=True, num_workers=self.hparams["num_workers"])

    def val_dataloader(self) -> DataLoader:
        assert self.held_out is not None, "setup() loads the token streams"
        return DataLoader(TensorDataset(self.windows(self.held_out, self.hparams["eval_windows"])),
                          batch_size=self.hparams["batch_size"])

    test_dataloader = val_dataloader


def tiny_llama(vocab_size: int = 2048, hidden_size: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
               intermediate_size: int = 256, max_positions: int = 256) -> Any:
    """A ``LlamaForCausalLM`` with grouped-query attention and an untied head, randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))


class CausalLM(pl.LightningModule):
    """Any ``AutoModelForCausalLM`` trained on next-token prediction; logs ``val/loss`` (perplexity is its exp) and
    ``val/acc`` (next-token accuracy), and the same under ``test/``.

    Args:
        model: the causal LM (default: :func:`tiny_llama`), or a local directory for ``from_pretrained``.
        lr: AdamW learning rate of the weights (0 keeps them frozen in value while masks learn).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup of the learning rate.
    """

    def __init__(self, model: Any = None, lr: float = 3e-4, weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            model = tiny_llama()
        elif isinstance(model, (str, Path)):
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(model)
        self.model = model.train()  # from_pretrained leaves it in eval mode

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).logits

    def _loss(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The mean next-token loss of a batch of windows, and its next-token accuracy."""
        window = batch[0]
        logits = self(window[:, :-1])
        targets = window[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return loss, (logits.argmax(-1) == targets).float().mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        loss, accuracy = self._loss(batch)
        self.log(f"{stage}/loss", loss)  # averaged over batches: equal windows a batch but the last
        self.log(f"{stage}/acc", accuracy)  # next-token accuracy

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / self.hparams.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
