"""Small models and data modules for the recipes, the default run and the tests."""

from .data import CIFAR10DataModule, DigitsDataModule, FashionMNISTDataModule, SyntheticDataModule, read_idx
from .models import (
    MLP,
    Classifier,
    LeNet5,
    LeNet5Caffe,
    ResNet20,
    TransferClassifier,
    TransformerClassifier,
    pretrained,
)

__all__ = [
    "CIFAR10DataModule",
    "Classifier",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "LeNet5",
    "LeNet5Caffe",
    "MLP",
    "ResNet20",
    "SyntheticDataModule",
    "TransferClassifier",
    "TransformerClassifier",
    "pretrained",
    "read_idx",
]
