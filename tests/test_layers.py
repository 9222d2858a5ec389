"""The package's layers, read from its source with an ``ast`` walk: each folder imports only the layers above it,
nothing outside the Lightning glue, the app and the zoo imports ``lightning``, and nothing outside the app imports
``hydra``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_masks"
#: each layer and the package layers it may import (root modules such as registry.py are open to all)
ALLOWED = {
    "masking": set(),
    "selection": {"masking"},
    "lifecycle": set(),
    "lightning": {"masking", "selection", "lifecycle"},
    "export": {"masking"},
    "app": {"masking", "selection", "lifecycle", "lightning", "export", "zoo"},
    "zoo": set(),
}
LIBRARIES = {"lightning": {"lightning", "app", "zoo"}, "hydra": {"app"}}


def _imports(path: Path) -> list[str]:
    """The absolute dotted names ``path`` imports (relative imports resolved against its package)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
    return names


def _layer(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_folder_of_the_package_is_a_known_layer():
    assert {_layer(path) for path in SOURCES} - {None} == set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_the_layers_above_it_and_its_layers_libraries(path):
    layer = _layer(path)
    for name in _imports(path):
        top, _, rest = name.partition(".")
        if top == "lightning_masks":
            target = rest.split(".")[0]
            if layer is not None and target in ALLOWED and target != layer:
                assert target in ALLOWED[layer], f"{path.name} ({layer}) imports {name}"
        elif top in LIBRARIES:
            assert layer in LIBRARIES[top], f"{path.relative_to(PACKAGE)} imports {name}"
