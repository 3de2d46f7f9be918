"""What the opt-in analyses share: their error, the task's images and labels, the datamodels
of another experiment to compare with.
"""
from __future__ import annotations

import numpy as np

from orchestrator import api
from orchestrator.errors import ConfigError, UserError
from orchestrator.plots.style import task_class_names
from orchestrator.storage import datamodels as dm_format
from orchestrator.storage.store import Layout


class AnalysisError(UserError):
    """An input an analysis stage cannot use: one line naming the setting or the missing output."""


def task_images(plan, stage: str, needed: bool = True):
    """(x_train, y_train, x_target, y_target, class names) of the task, or None (a task
    without images) where `needed` is false."""
    from workers.tasks import member
    images = member(plan.task, "arrays")
    if images is None:
        if needed:
            raise AnalysisError(f"{stage}: the task has no images (task.arrays()); {stage} compares training "
                                f"examples in input space, so it needs an image task (e.g. task=fmnist_mlp)")
        return None
    x_tr, y_tr, x_tg, y_tg, num_classes = images()
    return x_tr, y_tr, x_tg, y_tg, task_class_names(plan.task, int(num_classes))


def label(names, y) -> str:
    return names[int(y)] if names is not None and 0 <= int(y) < len(names) else str(int(y))


def other_experiment(other: str | None, plan):
    """The experiment at compare.other (api.Experiment), checked against this one without
    reading its weights (the stage's precheck, before Ray starts): one line naming
    compare.other and the fix otherwise."""
    if not other:
        raise ConfigError("compare.other must be set: the run directory or store URI of the experiment to compare "
                          "with (e.g. compare.other=runs/fmnist_mlp-<hash>)")
    try:
        exp = api.open(other)
    except api.ApiError as err:
        raise ConfigError(f"compare.other={other!r}: {err}") from None
    if exp.store.where() == plan.store.where():
        raise ConfigError(f"compare.other={other!r} is this experiment itself; pass another experiment's directory")
    if (exp.n, exp.n_targets) != (plan.n, plan.n_targets):
        raise ConfigError(f"compare.other={other!r} has n={exp.n} training examples and {exp.n_targets} targets, "
                          f"this experiment n={plan.n} and {plan.n_targets}; compare experiments on the same training "
                          f"set and targets")
    from omegaconf import OmegaConf
    mine = OmegaConf.to_container(plan.cfg.task, resolve=True)
    theirs = exp.config.get("task") or {}
    for key in ("_target_", "data.name", "subset_seed", "target_split", "train_subset"):
        a, b = dotted(mine, key), dotted(theirs, key)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"compare.other={other!r} has task.{key}={b!r}, this experiment {a!r}: not the same "
                              f"training set and targets; compare experiments of the same task")
    if exp.datamodels_dir is None:
        raise ConfigError(f"compare.other={other!r}: {exp.store.where()} has no datamodels; run stage=fit there")
    return exp


def other_datamodels(other: str | None, plan) -> tuple[np.ndarray, str]:
    """(weights [T, n], where) of the experiment at compare.other, checked against this one."""
    exp = other_experiment(other, plan)
    try:
        W, _, _ = exp.datamodel_arrays()
    except api.ApiError as err:
        raise ConfigError(f"compare.other={other!r}: {err} there") from None
    return W, f"{exp.store.where()}/{exp.datamodels_dir}"


def short(where: str) -> str:
    """<experiment>/datamodels/<fit> of a datamodels location, for a plot's title."""
    return "/".join(where.rstrip("/").split("/")[-3:])


def dotted(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def no_more_weights(shown: int, wanted: int) -> list:
    """The cells after a datamodel's `shown` positive-weight examples, up to `wanted`: a note,
    then gaps."""
    if shown >= wanted:
        return []
    note = "no positive\nweight in this\ndatamodel" if shown == 0 else "no more\npositive\nweights"
    return [(None, note, "dimgray")] + [None] * (wanted - shown - 1)


def datamodels(ctx, targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(weights [T, n], intercepts [T], directory) of the datamodels of all good train models;
    with `targets`, the rows of those targets only ([len(targets), n]), read one chunk at a
    time so that the driver never holds every target's weights."""
    plan = ctx.plan
    rel = dm_format.full_dir(plan, ctx.ledger_index())
    try:
        if targets is None:
            W, b, _ = dm_format.load_datamodels(plan.store, rel, plan.n_targets)
            return W, b, rel
        want = np.asarray(targets, np.int64)
        W, b = np.zeros((len(want), plan.n), np.float32), np.zeros(len(want), np.float32)
        for lo, hi, Wc, bc in dm_format.iter_datamodels(plan.store, rel, plan.n_targets):
            sel = np.flatnonzero((want >= lo) & (want < hi))
            W[sel], b[sel] = Wc[want[sel] - lo], bc[want[sel] - lo]
    except FileNotFoundError as err:
        raise AnalysisError(f"{plan.cfg.stage}: {err}") from None
    return W, b, rel


def check_datamodels(plan) -> None:
    """Before anything is written: the experiment has trained models and the datamodels of
    this run's models and fit settings (what every analysis reads)."""
    if not plan.store.list_dirs(Layout.DATAMODELS) or not (index := plan.ledger.index()).count("train"):
        models = "" if plan.store.list(Layout.LEDGER, ".parquet") else " (nor any trained models)"
        raise AnalysisError(f"{plan.cfg.stage}: {plan.store.where()} has no datamodels yet{models}; "
                            f"run stage=all (or stage=fit) first")
    want = dm_format.full_dir(plan, index)
    if not plan.store.list(want, ".parquet"):
        raise AnalysisError(f"{plan.cfg.stage}: {plan.store.where()} has no datamodels for these fit settings "
                            f"({want}); run stage=all (or stage=fit) first")
