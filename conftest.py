"""Every test and every doctest of the package leaves the global registries as it found them.

The package's docstring examples register entries (``square_root``, ``negated_magnitude``, ``magnitude_only``,
``TransposedLinear``) and tests register their own: without this, a second registration of the same name fails,
so the outcome would depend on the order the tests run in. This file sits at the repository root, beside
pyproject.toml (pytest's rootdir), so it applies to ``tests/`` and to the doctests of ``lightning_masks/`` alike
and does not ship inside the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator

import pytest


def _registry_dicts() -> list[dict]:
    """The dicts that hold registered entries: those of every ``Registry`` that is a module attribute of a loaded
    ``lightning_masks.*`` module (initializers, schedule shapes, importance criteria, layer kinds)."""
    importlib.import_module("lightning_masks")
    from lightning_masks.registry import Registry

    found: dict[int, dict] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "lightning_masks" or name.startswith("lightning_masks.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Registry):
                for attribute in vars(value).values():
                    if isinstance(attribute, dict):
                        found[id(attribute)] = attribute
    return list(found.values())


@pytest.fixture(autouse=True)
def _restore_registries() -> Iterator[None]:
    """Snapshot the registries' contents before each test or doctest and put them back, in place, after it."""
    saved = [(registry, dict(registry)) for registry in _registry_dicts()]
    yield
    for registry, contents in saved:
        registry.clear()
        registry.update(contents)
