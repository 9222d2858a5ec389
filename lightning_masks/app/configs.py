"""What the shipped Hydra configs point at: recipe registration, resolvers and the initializer adapter.

The configs ship inside the package: ``conf/`` as :mod:`lightning_masks.conf` and ``recipes/`` as
:mod:`lightning_masks.recipes` (see ``[tool.setuptools.package-dir]`` in ``pyproject.toml``). Run from a
source checkout that is not installed (or shadows a non-editable install), they are the checkout's folders.
"""

from __future__ import annotations

import inspect
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

import lightning_masks

from ..masking import Initializer, get_initializer

__all__ = ["CONFIG_DIR", "initializer", "list_recipes", "register"]

_PACKAGE_HEADER = "# @package"


def _shipped(module: str, folder: str) -> Path:
    """Return the folder of ``module`` (installed), else the source checkout's top-level ``folder``."""
    try:
        return Path(str(resources.files(module)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / folder


#: The Hydra config tree (``conf/``) and the recipes (``recipes/``).
CONFIG_DIR = _shipped("lightning_masks.conf", "conf")
_RECIPE_DIR = _shipped("lightning_masks.recipes", "recipes")


def initializer(name: str, noise_scale: Optional[float] = None, **options: Any) -> Initializer:
    """Build the registered initializer ``name``, giving ``noise_scale`` only to one that takes it.

    Every ``masks/init`` config carries ``noise_scale`` so that one sweep can cross init strategies with noise
    scales (``masks/init=magnitude,magnitude_noise masks.init.noise_scale=0.01,0.1``); an initializer without
    noise ignores it (with a logged note), and the sweep report marks it unused.

    Raises:
        ValueError: an unknown name (the message lists the known ones) or a bad option.
    """
    built = get_initializer(name, **options)
    if noise_scale is None:
        return built
    if "noise_scale" not in inspect.signature(type(built)).parameters:
        logging.getLogger(__name__).info("noise_scale=%s is not used by the %r initializer", noise_scale, name)
        return built
    return get_initializer(name, noise_scale=noise_scale, **options)


def list_recipes() -> list[str]:
    """Return the names of the shipped recipes (``recipe=NAME``)."""
    return sorted(path.stem for path in _RECIPE_DIR.glob("*.yaml"))


def _package(text: str) -> Optional[str]:
    """Return the ``# @package`` header of a config file, if any."""
    for line in text.splitlines():
        if line.startswith(_PACKAGE_HEADER):
            return line[len(_PACKAGE_HEADER):].strip()
    return None


def _run_name() -> str:
    """The job's overrides as one string (``a=1,b=2``), or the job name when there are none."""
    job = HydraConfig.get().job
    return job.override_dirname or job.name


def _sweep_group() -> Optional[str]:
    """The sweep folder (shared by every job of a multirun), or ``None`` for a single run."""
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def _default(name: str) -> Any:
    """The default that ``name`` (``Class.field``, a class of the package's top level) declares in Python, so that a
    config states it without writing it a second time: ``end: ${lm.default:Schedule.end}``."""
    owner, _, field = name.partition(".")
    return getattr(getattr(lightning_masks, owner), field)


def register() -> None:
    """Store every shipped recipe in Hydra's ConfigStore (group ``recipe``) and register the resolvers.

    Recipes live in the top-level ``recipes/`` folder rather than in ``conf/recipe/``; storing them here
    makes ``recipe=NAME`` work from a source checkout, an editable install and a wheel alike.
    """
    store = ConfigStore.instance()
    for name in list_recipes():
        text = (_RECIPE_DIR / f"{name}.yaml").read_text()
        store.store(name=name, node=OmegaConf.create(text), group="recipe", package=_package(text),
                    provider="lightning_masks")
    for resolver_name, resolver in (("lm.run_name", _run_name), ("lm.sweep_group", _sweep_group),
                                    ("lm.default", _default)):
        OmegaConf.register_new_resolver(resolver_name, resolver, replace=True)
