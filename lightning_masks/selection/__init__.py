"""Scores to keep bits: the Selector, importance criteria, the exact k-th engine, ties."""
