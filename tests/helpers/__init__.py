"""Helpers shared by the tests: small models, a quiet Trainer, reference implementations, exact-zero counts, data
files in the zoo's formats and a reader of W&B offline runs (``helpers.datafiles``, ``helpers.wandb_reader``)."""

from .counts import zeros_and_total
from .keep import keep_all, prune
from .models import TiedLM, TinyModule, TokenModule, make_trainer, synthetic_loader

__all__ = ["TiedLM", "TinyModule", "TokenModule", "keep_all", "make_trainer", "prune", "synthetic_loader",
           "zeros_and_total"]
