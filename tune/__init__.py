"""Hyperparameter sweeps over real training runs with Ray Tune, and µP transfer (see sweep.py)."""
