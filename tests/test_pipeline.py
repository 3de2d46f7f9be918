"""The whole pipeline on a local Ray instance, with a task defined here (the task seam)."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator import pipeline
from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Store
from tests.conftest import compose

pytestmark = pytest.mark.slow          # whole pipelines on Ray: 10-20 s each


class PlantedTask:
    """A user-defined task: margin_t(S) = w_t · 1_S + b_t + noise, with sparse planted w.

    Every call to train() leaves a file in `counter_dir` naming the model seeds it trained,
    so a test can count trainings (and models trained twice) across Ray worker processes.
    `delay` seconds per model make a run last long enough to inject faults; every model whose
    seed is divisible by `diverge_every` gets NaN margins (a diverged run)."""

    def __init__(self, n: int, n_targets: int, nonzeros: int = 5, noise: float = 0.05,
                 counter_dir: str | None = None, delay: float = 0.0, diverge_every: int = 0):
        self.n, self.n_targets = int(n), int(n_targets)
        rng = np.random.default_rng(1234)
        self.W = np.zeros((self.n_targets, self.n), np.float32)
        for t in range(self.n_targets):
            idx = rng.choice(self.n, nonzeros, replace=False)
            self.W[t, idx] = rng.choice([-1.0, 1.0], nonzeros) * rng.uniform(0.5, 1.5, nonzeros)
        self.b = rng.normal(size=self.n_targets).astype(np.float32)
        self.noise = noise
        self.counter_dir = counter_dir
        self.delay = float(delay)
        self.diverge_every = int(diverge_every)

    def check(self):
        if self.n < 10:
            raise ValueError(f"task.n={self.n} is too small; use task.n=10 or more")

    def setup(self, train_cfg):
        self.setup_calls = getattr(self, "setup_calls", 0) + 1

    def train(self, masks, seeds, return_weights=False):
        k = len(masks)
        noise = np.stack([np.random.default_rng(int(s)).normal(0, self.noise, self.n_targets) for s in seeds])
        margins = masks.astype(np.float32) @ self.W.T + self.b + noise.astype(np.float32)
        if self.diverge_every:
            margins[np.asarray(seeds) % self.diverge_every == 0] = np.nan
        if self.delay:
            time.sleep(self.delay * k)
        if self.counter_dir:
            os.makedirs(self.counter_dir, exist_ok=True)
            with open(os.path.join(self.counter_dir, f"{os.getpid()}-{int(seeds[0])}-{k}-{time.time_ns()}"), "w") as f:
                f.write(",".join(str(int(x)) for x in seeds))
        ones = np.ones(k, np.float32)
        return SimpleNamespace(margins=margins, train_acc=ones, target_acc=ones, loss=0 * ones,
                               state_dicts=None)


def trained_seeds(counter_dir) -> list[int]:
    """The seed of every model trained so far (a model trained twice appears twice)."""
    if not os.path.isdir(counter_dir):
        return []
    out = []
    for f in os.listdir(counter_dir):
        text = open(os.path.join(counter_dir, f)).read()
        out += [int(x) for x in text.split(",") if x]
    return out


def trained(counter_dir) -> int:
    return len(trained_seeds(counter_dir))


def planted_overrides(tmp_path, n=60, T=8, extra=()):
    return [
        "task._target_=tests.test_pipeline.PlantedTask", f"+task.n={n}", f"task.n_targets={T}",
        f"+task.counter_dir={tmp_path}/count", "~task.data", "~task.n_train",
        "~task.target_split", "~task.subset_seed", "~task.model", "~task.margin", "~task.name",
        "masks.n_train=400", "masks.n_eval=40", "eval.replicas=2", "train.models_per_unit=60",
        "fit.targets_per_task=4", "fit.n_lambdas=40", "fit.prefixes=[]", "baselines.methods=[]", "exp.name=planted",
        *extra,
    ]


def test_planted_model_recovered_and_resume_trains_nothing(tmp_path, ray_local):
    cfg = compose(planted_overrides(tmp_path), tmp_path)
    summary = pipeline.run(cfg)
    counted = trained(tmp_path / "count")
    assert counted == 400 + 40 * 2
    assert summary["models"] == {"train": 400, "eval": 80}
    lds = summary["lds"]["datamodels"]
    assert lds["mean"] > 0.9, lds
    assert lds["ci95"][0] <= lds["mean"] <= lds["ci95"][1]

    # the planted weights are what the fit recovered
    from orchestrator.storage.datamodels import load_datamodels
    W, b, _ = load_datamodels(Store(summary["experiment_dir"]), summary["fit"]["dir"], 8)
    task = PlantedTask(60, 8)
    assert np.corrcoef(W.ravel(), task.W.ravel())[0, 1] > 0.95
    on = task.W != 0
    assert np.abs(W[~on]).mean() < 0.1 * np.abs(W[on]).mean()

    # summary.json on disk matches
    with open(os.path.join(summary["experiment_dir"], "summary.json")) as f:
        disk = json.load(f)
    assert disk["lds"]["datamodels"]["mean"] == pytest.approx(lds["mean"])
    assert set(disk["timings"]) == {"masks", "train", "fit", "baselines", "evaluate"}

    # resume: the same experiment again trains nothing and refits nothing
    summary2 = pipeline.run(compose(planted_overrides(tmp_path), tmp_path))
    assert trained(tmp_path / "count") == counted
    assert summary2["train"]["models_trained"] == 0
    assert summary2["fit"]["chunks_fit"] == 0
    assert summary2["lds"]["datamodels"]["mean"] == pytest.approx(lds["mean"])

    # growing the experiment trains only the new models
    summary3 = pipeline.run(compose(planted_overrides(tmp_path, extra=["masks.n_train=460"]), tmp_path))
    assert trained(tmp_path / "count") == counted + 60
    assert summary3["models"]["train"] == 460


def test_stage_alone_and_lost_models_retrained(tmp_path, ray_local):
    cfg = compose(planted_overrides(tmp_path, extra=["stage=train"]), tmp_path)
    s = pipeline.run(cfg)
    assert "fit" not in s and "lds" not in s
    assert s["models"] == {"train": 400, "eval": 80}
    # delete one unit file: exactly its models are retrained on the next run
    led = Ledger(Store(s["experiment_dir"]))
    victim = [f for f in led.files() if os.path.basename(f).startswith("train-000001-")][0]
    os.remove(os.path.join(s["experiment_dir"], victim))
    before = trained(tmp_path / "count")
    s2 = pipeline.run(compose(planted_overrides(tmp_path, extra=["stage=train"]), tmp_path))
    assert s2["train"]["models_trained"] == 60
    assert trained(tmp_path / "count") == before + 60
    s3 = pipeline.run(compose(planted_overrides(tmp_path, extra=["stage=fit"]), tmp_path))
    assert s3["fit"]["chunks_fit"] == 2 and "lds" not in s3
    s4 = pipeline.run(compose(planted_overrides(tmp_path, extra=["stage=evaluate"]), tmp_path))
    assert s4["lds"]["datamodels"]["mean"] > 0.9
    # a fit chunk is done when it reads back verified, not because its name exists
    chunk = os.path.join(s["experiment_dir"], s3["fit"]["dir"], "chunk-000000-000004.parquet")
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
    open(chunk, "wb").write(bytes(data))
    s5 = pipeline.run(compose(planted_overrides(tmp_path, extra=["stage=fit"]), tmp_path))
    assert s5["fit"]["chunks_fit"] == 1
    # summary.json keeps what earlier stages wrote
    assert "lds" in s5 and s5["lds"]["datamodels"]["mean"] == pytest.approx(s4["lds"]["datamodels"]["mean"])


def test_torch_backend_through_the_fit_stage(tmp_path, ray_local):
    """fit=torch (batched solver) in the Ray fit stage recovers the planted datamodels too."""
    over = planted_overrides(tmp_path) + ["fit=torch", "fit.targets_per_task=8", "fit.prefixes=[0.5]",
                                          "fit.n_lambdas=40"]
    s = pipeline.run(compose(over, tmp_path))
    assert s["lds"]["datamodels"]["mean"] > 0.9
    assert "-torch-" in s["fit"]["dir"] and s["fit"]["chunks"] == 1
    # the prefix fit (200 of 400 models) is there and scored on the curve
    assert list(s["fit"]["prefixes"]) == [200]
    assert set(s["lds_curve"]) == {"200", "400"}
    assert s["lds_curve"]["200"]["mean"] > 0.5
