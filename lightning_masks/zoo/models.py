"""Small classifiers: plain LightningModules that know nothing of masks."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, cast

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["MLP", "Classifier", "LeNet5", "ResNet20", "TransferClassifier", "TransformerClassifier", "pretrained"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


#: Constructor arguments that are factories, not values: kept out of the saved hyperparameters.
_NOT_HYPERPARAMETERS = ["optimizer", "scheduler"]


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``net`` with Adam, logging loss and accuracy per stage.

    Args:
        net: maps a batch of inputs to class logits.
        num_classes: number of classes.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        optimizer: ``params -> optimizer`` (e.g. a Hydra ``_partial_`` of ``torch.optim.SGD``) used instead of
            Adam; ``lr`` and ``weight_decay`` are then ignored.
        scheduler: ``optimizer -> LR scheduler``, stepped once per epoch.
    """

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimizer: Optional[OptimizerFactory] = None, scheduler: Optional[SchedulerFactory] = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.metrics = nn.ModuleDict({stage: MulticlassAccuracy(num_classes, average="micro")
                                      for stage in ("train_", "val_", "test_")})

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = nn.functional.cross_entropy(logits, targets)
        accuracy = cast(MulticlassAccuracy, self.metrics[f"{stage}_"])
        accuracy(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", sync_dist=stage != "train")
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

    def configure_optimizers(self) -> Any:
        optimizer: torch.optim.Optimizer
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"],
                                         weight_decay=self.hparams["weight_decay"])
        else:
            optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


class MLP(Classifier):
    """A multilayer perceptron classifier (LeNet-300-100 with ``hidden=(300, 100)``).

    Args:
        in_features: input size (flattened).
        num_classes: number of classes.
        hidden: hidden layer widths.
        lr, weight_decay, optimizer, scheduler: see :class:`Classifier`.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128, 64),
                 lr: float = 1e-3, weight_decay: float = 0.0, **training: Any) -> None:
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        super().__init__(nn.Sequential(*layers), num_classes, lr, weight_decay, **training)
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)


class LeNet5(Classifier):
    """LeNet-5 (LeCun et al. 1998): two 5x5 conv + max-pool stages, then 120-84-classes linear layers.

    The 6-16-120-84 variant with the first conv padded by 2 (so a 28x28 input sees LeCun's 32x32 geometry):
    conv5x5(6)-pool-conv5x5(16)-pool-fc400→120-fc120→84-fc84→10, 61,470 weights at 28x28 (biases aside). The
    pruning literature's "LeNet-5" is usually the wider :class:`LeNet5Caffe`.

    Args:
        in_channels: image channels.
        image_size: side of the square input (28 for MNIST-like, 32 for CIFAR).
        num_classes: number of classes.
        lr, weight_decay, optimizer, scheduler: see :class:`Classifier`.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **training: Any) -> None:
        side = ((image_size // 2) - 4) // 2  # conv(pad 2), pool, conv(no pad), pool
        if side < 1:
            raise ValueError(f"LeNet5 needs image_size >= 12, got {image_size}")
        net = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
        )
        super().__init__(net, num_classes, **training)
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)


class LeNet5Caffe(Classifier):
    """LeNet-5-Caffe, the pruning literature's LeNet-5 (Caffe's MNIST example; Han et al. 2015, Molchanov et al. 2017).

    conv5x5(20)-pool-conv5x5(50)-pool-fc800→500-fc500→classes, no padding, ReLU, max-pool 2: 430,500 weights at
    28x28 with 10 classes (biases aside), the "431K" of Han et al. 2015 ("Learning both weights and connections")
    and of Sparse VD (Molchanov et al. 2017, "Variational Dropout Sparsifies Deep Neural Networks": 0.75% MNIST
    test error at 99.64% sparsity).

    Args:
        in_channels: image channels.
        image_size: side of the square input (28 for MNIST-like).
        num_classes: number of classes.
        lr, weight_decay, optimizer, scheduler: see :class:`Classifier`.

    Raises:
        ValueError: ``image_size`` below 16 (no pixel left after the second pool).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **training: Any) -> None:
        side = ((image_size - 4) // 2 - 4) // 2  # conv (no pad), pool, conv, pool
        if side < 1:
            raise ValueError(f"LeNet5Caffe needs image_size >= 16, got {image_size}")
        net = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(50 * side * side, 500), nn.ReLU(), nn.Linear(500, num_classes),
        )
        super().__init__(net, num_classes, **training)
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: where the shape changes, subsample and zero-pad channels
    (``"pad"``, option A: no parameters) or a strided 1x1 conv-BN (``"projection"``, option B)."""

    def __init__(self, width_in: int, width_out: int, stride: int, shortcut: str = "pad") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width_in, width_out, 3, stride, 1, bias=False), nn.BatchNorm2d(width_out), nn.ReLU(),
            nn.Conv2d(width_out, width_out, 3, 1, 1, bias=False), nn.BatchNorm2d(width_out),
        )
        self.stride, self.extra = stride, width_out - width_in
        changes = stride > 1 or width_out != width_in
        self.shortcut = nn.Sequential(nn.Conv2d(width_in, width_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(width_out)) if shortcut == "projection" and changes else None

    def forward(self, inputs: Tensor) -> Tensor:
        if self.shortcut is not None:
            return torch.relu(self.body(inputs) + self.shortcut(inputs))
        shortcut = inputs[:, :, ::self.stride, ::self.stride]
        if self.extra:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return torch.relu(self.body(inputs) + shortcut)


class ResNet20(Classifier):
    """ResNet-20 for 32x32 images (He et al. 2016, https://arxiv.org/abs/1512.03385, section 4.2).

    Three stages of ``blocks`` basic blocks at ``width``, ``2*width``, ``4*width`` channels
    (``blocks=3`` is ResNet-20, 5 is ResNet-32), global average pooling and a linear classifier.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        width: channels of the first stage.
        blocks: basic blocks per stage.
        shortcut: ``"pad"`` (option A of the paper, no parameters) or ``"projection"`` (option B, a 1x1
            conv-BN where the shape changes). With projections each stage's residual stream is written only
            by BatchNorms (the stem's or a shortcut's, and each block's second), so channel masks tied across
            them (``MaskPruningCallback(tie=coupled_channels(model, example))``) free stream channels that
            export can remove.
        lr, weight_decay, optimizer, scheduler: see :class:`Classifier`.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, blocks: int = 3,
                 shortcut: str = "pad", **training: Any) -> None:
        if shortcut not in ("pad", "projection"):
            raise ValueError(f"shortcut must be 'pad' or 'projection', got {shortcut!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU()]
        widths = [width, width, 2 * width, 4 * width]
        for stage in range(3):
            for block in range(blocks):
                first = block == 0
                layers.append(_BasicBlock(widths[stage] if first else widths[stage + 1], widths[stage + 1],
                                          2 if first and stage > 0 else 1, shortcut))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes)]
        super().__init__(nn.Sequential(*layers), num_classes, **training)
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)


class _EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block built on :class:`torch.nn.MultiheadAttention`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, tokens: Tensor) -> Tensor:
        normed = self.norm1(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens + self.mlp(self.norm2(tokens))


class _Tokens(nn.Module):
    """Cut each input into ``seq_len`` tokens (rows of an image, or chunks of a flat vector) and embed them."""

    def __init__(self, seq_len: int, token_dim: int, dim: int) -> None:
        super().__init__()
        self.seq_len, self.token_dim = seq_len, token_dim
        self.embed = nn.Linear(token_dim, dim)
        self.position = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.embed(inputs.reshape(len(inputs), self.seq_len, self.token_dim)) + self.position


class _MeanPool(nn.Module):
    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


class TransformerClassifier(Classifier):
    """A small Transformer encoder classifier: tokens from rows of the input, mean-pooled.

    Each input is reshaped to ``seq_len x token_dim`` (an 8x8 digit: 8 rows of 8 pixels; a 28x28 image:
    28 rows of 28), embedded, passed through ``depth`` encoder blocks and mean-pooled.

    Args:
        seq_len, token_dim: the token grid; ``seq_len * token_dim`` must equal the input size.
        num_classes: number of classes.
        dim, depth, heads, mlp_ratio, dropout: the encoder's width, blocks, attention heads, MLP
            expansion and dropout.
        lr, weight_decay, optimizer, scheduler: see :class:`Classifier`.
    """

    def __init__(self, seq_len: int = 8, token_dim: int = 8, num_classes: int = 10, dim: int = 32, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0, **training: Any) -> None:
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        net = nn.Sequential(_Tokens(seq_len, token_dim, dim),
                            *(_EncoderBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)),
                            nn.LayerNorm(dim), _MeanPool(), nn.Linear(dim, num_classes))
        super().__init__(net, num_classes, **training)
        self.save_hyperparameters(ignore=_NOT_HYPERPARAMETERS)



def pretrained(model: Classifier, datamodule: pl.LightningDataModule, epochs: int, path: str | os.PathLike,
               seed: int = 0) -> Classifier:
    """Return ``model`` trained (dense) on ``datamodule`` for ``epochs``, its weights cached at ``path``.

    The first call trains it (seeded with ``seed`` inside a forked RNG, so the caller's random state is untouched)
    and saves its state dict to ``path``; a later call loads that file instead. The file stands for this model,
    data and length: name it after them, since nothing checks a cached file against them.
    """
    path = Path(path).expanduser()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, deterministic=True)
        trainer.fit(model, datamodule=datamodule)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


class TransferClassifier(Classifier):
    """A pretrained classifier's layers but the last (the backbone) under a new linear head, for another task.

    The network is ``net = Sequential(backbone=..., head=Linear(...))``: masks targets name ``net.backbone.*`` and
    ``net.head``. The backbone trains at ``backbone_lr`` (Adam, its own param group); ``backbone_lr=0`` freezes it
    (``requires_grad_(False)``, out of the optimizer), the fine-pruning of a frozen backbone
    (``MaskPruningCallback(frozen="mask")`` learns masks over it).

    Args:
        source: the pretrained :class:`Classifier` (its ``net`` a ``Sequential`` ending in a ``Linear``), e.g. from
            :func:`pretrained`.
        num_classes: classes of the new task.
        backbone_lr: the backbone's Adam learning rate; 0 freezes it.
        lr: the head's Adam learning rate.
        weight_decay: Adam weight decay of both.

    Raises:
        ValueError: a ``source`` whose ``net`` does not end in a ``Linear``, or a negative ``backbone_lr``.
    """

    def __init__(self, source: Classifier, num_classes: int, backbone_lr: float = 1e-4, lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        layers = list(getattr(source, "net", ()))
        if not layers or not isinstance(layers[-1], nn.Linear):
            raise ValueError(f"source must be a zoo Classifier whose net ends in a Linear layer, got "
                             f"{type(source).__name__}")
        if not backbone_lr >= 0:
            raise ValueError(f"backbone_lr must be >= 0 (0 freezes the backbone), got {backbone_lr!r}")
        net = nn.Sequential(OrderedDict(backbone=nn.Sequential(*layers[:-1]),
                                        head=nn.Linear(layers[-1].in_features, num_classes)))
        super().__init__(net, num_classes, lr, weight_decay)
        self.save_hyperparameters(ignore=["source"])
        if backbone_lr == 0:
            net.backbone.requires_grad_(False)

    def configure_optimizers(self) -> Any:
        head, body = cast(nn.Module, self.net.head), cast(nn.Module, self.net.backbone)  # the Sequential's children
        groups = [{"params": list(head.parameters()), "lr": self.hparams["lr"]}]
        backbone = [p for p in body.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": self.hparams["backbone_lr"]})
        return torch.optim.Adam(groups, weight_decay=self.hparams["weight_decay"])
