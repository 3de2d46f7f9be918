"""Tasks: what is trained and measured (dataset + model + recipe + margin).

The orchestrator never imports a dataset or network; it builds a task from config
(`_target_`). A user's own task only needs the methods of `Task` below. The shipped one,
`ImageClassificationTask`, covers Fashion-MNIST, digits and CIFAR-10 with an MLP or ResNet-9.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Task(Protocol):
    """What the pipeline asks of a task.

    n: training set size (masks are bool [k, n]); n_targets: number of target examples T.
    check(): cheap validation on the driver before any Ray work; raise ValueError with one
      line naming the setting and the fix.
    setup(train_cfg): once per persistent worker (load data onto the device, build the trainer).
    train(masks, seeds, return_weights): train k models; return an object with attributes
      margins float32 [k, T], train_acc, target_acc, loss (float32 [k]) and, if asked,
      state_dicts (list of k state dicts). stage=mislabel's repair check also passes
      labels= (int [n], the training labels to use), which only a task with true_labels() needs.
    """

    n: int
    n_targets: int

    def check(self) -> None: ...

    def setup(self, train_cfg: dict) -> None: ...

    def train(self, masks: np.ndarray, seeds: np.ndarray, return_weights: bool = False): ...


# What a task may have beyond `Task`, and what the pipeline assumes where it has not: read
# every one through `member(task, name)` (a task may also inherit these from `TaskDefaults`).
OPTIONAL: dict[str, Any] = {
    # the margin every method and the LDS use (workers.margins.MARGIN_KINDS)
    "margin": "logsumexp",
    # () -> (x_train uint8 [n, C, H, W], y_train, x_target, y_target, num_classes): the images,
    # for the plots of top examples and the image analyses (leakage, embedding)
    "arrays": None,
    # () -> (model_fn, x_train, y_train, x_target, y_target), the model and float inputs the
    # attribution baselines differentiate (TRAK, TracIn, representer points, influence)
    "attribution_inputs": None,
    # () -> the names of labels 0..num_classes-1, for captions
    "class_names": None,
    # () -> (the true labels of the training set, flipped bool [n]) where the task planted label
    # noise in it (task.label_noise), else None
    "true_labels": None,
}


def member(task, name: str):
    """The task's optional member `name` (OPTIONAL), or its declared default."""
    return getattr(task, name, OPTIONAL[name])


class TaskDefaults:
    """OPTIONAL's defaults, for a task class that prefers to inherit them."""

    margin: str = OPTIONAL["margin"]
    arrays = None
    attribution_inputs = None
    class_names = None
    true_labels = None


# task.targets: test, margins on the targets; train, the training examples are the targets (with
# their given labels: T = n, datamodels of the training examples themselves); both, the test
# targets, and each model's margins on every training example beside them (TrainResult.self_*)
TARGETS = ("test", "train", "both")


class ImageClassificationTask:
    """Image classification on a subset of a published dataset, margins on test targets.

    label_noise: the fraction of the training subset whose labels are flipped, each to a label
    drawn uniformly from the other classes (workers.data.flip_labels, seeded by noise_seed);
    the models train on the noisy labels, the targets keep theirs, and `true_labels()` says
    which were flipped. targets="both": each model's margins on every training example (against
    the label it trained on) and whether it gets each right are returned too (TrainResult.self_*).
    targets="train": the training examples are the targets, with the labels the models train
    on (task.n_targets must equal task.n_train).
    """

    def __init__(self, name: str, data: dict, n_train: int, n_targets: int, model: dict,
                 margin: str = "logsumexp", target_split: str = "test", subset_seed: int = 0,
                 label_noise: float = 0.0, noise_seed: int = 0, targets: str = "test"):
        self.name = name
        self.data_cfg = dict(data)
        self.n = int(n_train)
        self.n_targets = int(n_targets)
        self.model_cfg = dict(model)
        self.margin = margin
        self.target_split = target_split
        self.subset_seed = int(subset_seed)
        self.label_noise = float(label_noise)
        self.noise_seed = int(noise_seed)
        self.targets = str(targets)
        self._arrays = None
        self._true_labels: tuple[np.ndarray, np.ndarray] | None = None
        self._trainer: Any = None

    # -------------------------------------------------------------- data
    def check(self) -> None:
        from workers import data as D
        from workers.margins import MARGIN_KINDS
        if self.margin not in MARGIN_KINDS:
            raise ValueError(f"task.margin={self.margin!r} is not one of {MARGIN_KINDS}; pick one")
        if self.n < 2:
            raise ValueError(f"task.n_train={self.n} must be at least 2")
        if self.n_targets < 1:
            raise ValueError(f"task.n_targets={self.n_targets} must be at least 1")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"task.label_noise={self.label_noise} must be in [0, 1): the fraction of "
                             f"training labels to flip, e.g. task.label_noise=0.1")
        if self.targets not in TARGETS:
            raise ValueError(f"task.targets={self.targets} is not one of {'|'.join(TARGETS)}: test records the "
                             f"margins on the targets, train takes the training examples as the targets, both "
                             f"records each model's margins on the training examples beside the targets")
        if self.targets == "train" and self.n_targets != self.n:
            raise ValueError(f"task.targets=train takes the {self.n} training examples as the targets: set "
                             f"task.n_targets={self.n} (it is {self.n_targets})")
        if self.label_noise > 0 and self.target_split == "train" and self.targets != "train":
            raise ValueError("task.label_noise>0 with task.target_split=train would score targets against "
                             "flipped labels; use task.target_split=test")
        D.check_available(self.data_cfg["name"], self.data_cfg.get("root"))
        self.arrays()  # sizes are checked by select()

    def arrays(self):
        """(x_train uint8 [n,C,H,W], y_train, x_target, y_target, num_classes), cached."""
        if self._arrays is None:
            from workers import data as D
            ds = D.load_dataset(self.data_cfg["name"], self.data_cfg.get("root"))
            x_tr, y_tr, x_tg, y_tg = D.select(ds, self.n, 1 if self.targets == "train" else self.n_targets,
                                              seed=self.subset_seed, target_split=self.target_split)
            if self.label_noise > 0:
                noisy, flipped = D.flip_labels(y_tr, ds.num_classes, self.label_noise, self.noise_seed)
                self._true_labels = (y_tr, flipped)
                y_tr = noisy
            if self.targets == "train":      # the training examples themselves, with the labels trained on
                x_tg, y_tg = x_tr, y_tr
            self._arrays = (x_tr, y_tr, x_tg, y_tg, ds.num_classes)
        return self._arrays

    def true_labels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(the training subset's true labels, flipped bool [n]) with task.label_noise > 0, else None."""
        self.arrays()
        return self._true_labels

    # -------------------------------------------------------------- training
    def class_names(self) -> list[str] | None:
        """The names of the dataset's labels (workers.data.CLASS_NAMES), if it has them."""
        from workers.data import CLASS_NAMES
        names = CLASS_NAMES.get(str(self.data_cfg.get("name")) if isinstance(self.data_cfg, dict) else "")
        return list(names) if names is not None else None

    def setup(self, train_cfg: dict) -> None:
        from workers.train import TrainConfig, Trainer
        names = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in train_cfg.items() if k in names})
        x_tr, y_tr, x_tg, y_tg, num_classes = self.arrays()
        self._trainer = Trainer(dict(self.model_cfg), cfg, x_tr, y_tr, x_tg, y_tg, margin=self.margin,
                                self_targets=self.targets == "both")

    def train(self, masks: np.ndarray, seeds: np.ndarray, return_weights: bool = False,
              labels: np.ndarray | None = None):
        """labels: the training labels for these models in place of the task's (the repair check
        of stage=mislabel trains with the true labels restored where it says)."""
        if self._trainer is None:
            raise RuntimeError("task.setup(train_cfg) must be called before task.train()")
        return self._trainer.train(masks, seeds, return_weights=return_weights, labels=labels)

    # -------------------------------------------------------------- baselines
    def attribution_inputs(self):
        """(model_fn, x_train, y_train, x_target, y_target) as float32 normalized tensors."""
        import torch

        from workers.models import build_model
        from workers.train_parts import channel_stats, normalize
        x_tr, y_tr, x_tg, y_tg, num_classes = self.arrays()
        mean, std = channel_stats(x_tr)  # exactly the trainer's input normalization
        def norm(x):
            return normalize(x, mean, std)
        in_shape = tuple(x_tr.shape[1:])
        cfg = dict(self.model_cfg)
        def model_fn():
            return build_model(cfg, in_shape, num_classes)
        return (model_fn, norm(x_tr), torch.from_numpy(y_tr.astype(np.int64)),
                norm(x_tg), torch.from_numpy(y_tg.astype(np.int64)))
