"""Small classifiers: plain LightningModules that know nothing of masks."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["MLP", "Classifier"]


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``net`` with Adam, logging loss and accuracy per stage.

    Args:
        net: maps a batch of inputs to class logits.
        num_classes: number of classes.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.metrics = nn.ModuleDict({stage: MulticlassAccuracy(num_classes, average="micro")
                                      for stage in ("train_", "val_", "test_")})

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = nn.functional.cross_entropy(logits, targets)
        accuracy = self.metrics[f"{stage}_"]
        accuracy(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train")
        self.log(f"{stage}/acc", accuracy, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class MLP(Classifier):
    """A multilayer perceptron classifier (LeNet-300-100 with ``hidden=(300, 100)``).

    Args:
        in_features: input size (flattened).
        num_classes: number of classes.
        hidden: hidden layer widths.
        lr, weight_decay: see :class:`Classifier`.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128, 64),
                 lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        super().__init__(nn.Sequential(*layers), num_classes, lr, weight_decay)
        self.save_hyperparameters()
