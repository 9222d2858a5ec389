"""What ``import lightning_masks`` costs a user: no torch_pruning until it is used, the user's matplotlib backend left
alone, and no matplotlib module beyond those ``import lightning.pytorch`` loads anyway. Each import runs in a fresh
interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import {module}
loaded = sorted(name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib."))
torch_pruning = "torch_pruning" in sys.modules
import matplotlib
print(json.dumps({{"matplotlib": loaded, "torch_pruning": torch_pruning, "backend": matplotlib.get_backend()}}))
"""


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, dict]:
    """What a fresh interpreter has loaded after ``import lightning_masks`` and after ``import lightning.pytorch``
    alone, with the user's backend chosen as ``MPLBACKEND=svg`` (run from an empty folder: the package as
    installed, or as PYTHONPATH puts it first)."""
    env = {**os.environ, "MPLBACKEND": "svg"}
    cwd = tmp_path_factory.mktemp("imports")
    runs = {module: subprocess.Popen([sys.executable, "-c", PROBE.format(module=module)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for module in ("lightning_masks", "lightning.pytorch")}
    results = {}
    for module, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        results[module] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.slow
def test_import_does_not_load_torch_pruning(imported):
    assert not imported["lightning_masks"]["torch_pruning"]


@pytest.mark.slow
def test_import_keeps_the_users_matplotlib_backend(imported):
    assert imported["lightning_masks"]["backend"] == "svg"


@pytest.mark.slow
def test_import_loads_no_matplotlib_module_beyond_lightnings_own(imported):
    extra = set(imported["lightning_masks"]["matplotlib"]) - set(imported["lightning.pytorch"]["matplotlib"])
    assert not extra
