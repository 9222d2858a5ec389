"""Quiet logs and the tiny_module fixture; the shared models and helpers live in the helpers package."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
from helpers import TinyModule

warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LitLogger|litlogger).*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


@pytest.fixture
def tiny_module() -> TinyModule:
    pl.seed_everything(0, verbose=False)
    return TinyModule()
