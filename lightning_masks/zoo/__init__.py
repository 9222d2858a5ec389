"""Small models and data modules for the recipes, the default run and the tests."""

from .data import DigitsDataModule
from .models import MLP, Classifier

__all__ = ["MLP", "Classifier", "DigitsDataModule"]
