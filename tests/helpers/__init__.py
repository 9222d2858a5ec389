"""Helpers shared by the tests: small models, a quiet Trainer and reference implementations."""

from .models import TiedLM, TinyModule, make_trainer, synthetic_loader

__all__ = ["TiedLM", "TinyModule", "make_trainer", "synthetic_loader"]
