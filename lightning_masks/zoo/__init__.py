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
from .text import CausalLM, PythonSourceDataModule, tiny_llama

__all__ = [
    "CIFAR10DataModule",
    "CausalLM",
    "Classifier",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "LeNet5",
    "LeNet5Caffe",
    "MLP",
    "PythonSourceDataModule",
    "ResNet20",
    "SyntheticDataModule",
    "TransferClassifier",
    "TransformerClassifier",
    "pretrained",
    "read_idx",
    "tiny_llama",
]
