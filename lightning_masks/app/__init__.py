"""The Hydra app: train, the sweep report, the config store."""

from .._extras import extra

with extra("app"):  # every module of the app needs them
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401
    import scipy  # noqa: F401
