"""Compute accounting: the seconds a method's LDS cost, counting the training of the models
it uses (m models for the datamodels, K checkpoint models for a baseline) and its fitting or
scoring.
"""
from __future__ import annotations


def baseline_compute(scoring_seconds, checkpoints, per_model) -> tuple[float | None, dict]:
    """(total seconds, parts) of a baseline scored from `checkpoints` trained models: training
    them (checkpoints × per_model, the mean seconds of one trained model) + its own scoring
    seconds. The total is None when either part is unknown."""
    train = None if per_model is None or checkpoints is None else float(per_model) * int(checkpoints)
    parts = {"checkpoints": train, "scoring": None if scoring_seconds is None else float(scoring_seconds)}
    total = None if train is None or parts["scoring"] is None else train + parts["scoring"]
    return total, parts


def datamodels_compute(models, per_model, fitting_seconds) -> tuple[float | None, dict]:
    """(total seconds, parts) of datamodels fit on `models` trained models: training them
    (models × per_model) + fitting the lasso (worker-seconds of the fit)."""
    train = None if per_model is None or models is None else float(per_model) * int(models)
    parts = {"training": train, "fitting": None if fitting_seconds is None else float(fitting_seconds)}
    total = None if train is None or parts["fitting"] is None else train + parts["fitting"]
    return total, parts
