"""Data modules that need no download."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule"]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), shipped inside the package: no download.

    Args:
        batch_size: training batch size.
        val_fraction, test_fraction: held-out shares, split with ``seed``.
        num_workers: DataLoader workers.
    """

    num_features = 64
    num_classes = 10

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        inputs = torch.tensor(images, dtype=torch.float32) / 16.0
        targets = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = int(len(order) * self.val_fraction), int(len(order) * self.test_fraction)
        parts = order.split([len(order) - n_val - n_test, n_val, n_test])
        self.train_set, self.val_set, self.test_set = (TensorDataset(inputs[p], targets[p]) for p in parts)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
