"""Sweeps: the spec (search space, scheduler, metric) and the driver (Ray Tune trials, MLflow child runs)."""
