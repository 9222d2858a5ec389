"""Hydra configs of the ``lightning-masks-train`` command (a package so that they ship in the wheel)."""
