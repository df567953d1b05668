"""Optuna studies whose trials are (DDP) `md4 fit` runs: the `md4-sweep` command (see sweeps/README.md)."""
