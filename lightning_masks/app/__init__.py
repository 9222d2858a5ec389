"""The Hydra app: train, the sweep report, the config store."""
