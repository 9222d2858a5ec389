"""Helpers shared by the tests: reference implementations and small models (import from here, not conftest)."""
