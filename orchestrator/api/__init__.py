"""A Python API over a finished experiment: what a researcher reads in a notebook.

`open(where)` reads an experiment from its store (config.yaml, summary.json, datamodels/,
scores/, ledger/) with the store's verified reads, without Hydra and without Ray. Every
reader is the one the stages use (load_datamodels, read_scores, Ledger.load, eval_set), so
the arrays here are the arrays the pipeline fitted and scored. Reading never writes: a
ledger file that fails verification is an error here, not a quarantine. Bad input is one
line naming the argument and the fix (`ApiError`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from orchestrator.errors import UserError
from orchestrator.metrics.lds import score_method
from orchestrator.settings.task import n_self
from orchestrator.storage.datamodels import load_datamodels
from orchestrator.storage.evalset import eval_set
from orchestrator.storage.ledger import Identity, Ledger, LedgerError, limits
from orchestrator.storage.scores import BaselinesError, open_scores, wanted_files
from orchestrator.storage.store import CorruptFile, Layout, Store, StoreError
from workers import bits

__all__ = ["ApiError", "Datamodel", "Experiment", "Top", "open"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")


class ApiError(UserError, ValueError):
    """A question the experiment cannot answer as asked: one line naming the argument and the fix."""


@dataclass(frozen=True)
class Datamodel:
    """The datamodel of one target: margin ≈ weights · mask + bias."""
    target: int
    weights: np.ndarray      # float32 [n]
    bias: float
    lam: float               # the lasso's λ, chosen by validation MSE
    nnz: int                 # non-zero weights
    val_mse: float           # validation MSE at that λ


@dataclass(frozen=True)
class Top:
    """The k training examples with the most positive and the most negative scores for a target."""
    target: int
    method: str
    positive: np.ndarray            # int64 [k], the most positive first
    positive_scores: np.ndarray     # float32 [k]
    negative: np.ndarray            # int64 [k], the most negative first
    negative_scores: np.ndarray     # float32 [k]


def open(where: str, datamodels: str | None = None, retry_seconds: float = 60.0) -> Experiment:  # noqa: A001
    """The experiment at `where`: a run directory (runs/<name>-<hash>) or its store URI
    (s3://bucket/prefix/<name>-<hash>). `datamodels` picks a datamodels directory by name
    (e.g. a prefix fit, `m500-torch-a969545d`); by default, that of the last fit."""
    try:
        store = Store(str(where), retry_seconds)
    except StoreError as err:
        raise ApiError(f"where={where!r}: {err}") from None
    return Experiment(store, datamodels)


def _read_json(store, rel: str) -> dict | None:
    try:
        data = json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ApiError(f"{store.where(rel)} is not valid JSON ({err}); re-run the stage that writes it") from None
    except StoreError as err:
        raise ApiError(str(err)) from None
    if not isinstance(data, dict):
        raise ApiError(f"{store.where(rel)} holds a JSON {type(data).__name__}, not an object; re-run the stage "
                       f"that writes it")
    return data


class Experiment:
    """A finished (or partly finished) experiment, read from its store. Arrays are read on
    first use and kept."""

    def __init__(self, store: Store, datamodels: str | None = None):
        self.store = store
        summary = _read_json(store, Layout.SUMMARY)
        config_text = self._read_text(Layout.CONFIG)
        if summary is None or config_text is None:
            missing = " and ".join(r for r, v in ((Layout.SUMMARY, summary), (Layout.CONFIG, config_text))
                                   if v is None)
            raise ApiError(f"{store.where()} is not an experiment (no {missing}); pass the run directory the "
                           f"pipeline printed (results: runs/<name>-<hash>) or its store URI")
        from omegaconf import OmegaConf
        self.summary: dict = summary
        try:
            config = OmegaConf.to_container(OmegaConf.create(config_text), resolve=False)
        except Exception as err:  # noqa: BLE001 - YAML and OmegaConf errors of many kinds
            config = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
        if not isinstance(config, dict):
            why = config if isinstance(config, str) else f"a YAML {type(config).__name__}, not a mapping"
            raise ApiError(f"{store.where(Layout.CONFIG)} is not a readable config ({why}); re-run the pipeline "
                           f"on this experiment to rewrite it")
        self.config = config
        try:
            self.n = int(summary["n"])
            self.n_targets = int(summary["n_targets"])
        except (KeyError, TypeError, ValueError):
            raise ApiError(f"{store.where(Layout.SUMMARY)} lacks n or n_targets; re-run the pipeline on this "
                           f"experiment to rewrite it") from None
        self.datamodels_dir = self._datamodels_dir(datamodels)
        self._cache: dict[str, Any] = {}          # scores files and the eval set, once read

    def __repr__(self) -> str:
        return f"Experiment({self.store.where()!r}, n={self.n}, n_targets={self.n_targets})"

    def _read_text(self, rel: str) -> str | None:
        try:
            return self.store.read_bytes(rel).decode()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise ApiError(f"{self.store.where(rel)} is not text; re-run the pipeline on this experiment to "
                           f"rewrite it") from None
        except StoreError as err:
            raise ApiError(str(err)) from None

    # ------------------------------------------------------------------ datamodels
    @property
    def datamodels_dirs(self) -> list[str]:
        """The names of every datamodels directory in the store (the full fit and its prefixes)."""
        return self.store.list_dirs(Layout.DATAMODELS)

    def _datamodels_dir(self, name: str | None) -> str | None:
        """datamodels/<name>: the one asked, else the last fit's (summary.json's fit entry)."""
        if name is None:
            rel = (self.summary.get("fit") or {}).get("dir")
            return str(rel) if rel else None
        name = str(name).removeprefix(f"{Layout.DATAMODELS}/")
        have = self.datamodels_dirs
        if name not in have:
            raise ApiError(f"datamodels={name!r}: {self.store.where(Layout.DATAMODELS)} holds "
                           f"{have or 'no datamodels'}; pick one of those")
        return f"{Layout.DATAMODELS}/{name}"

    @cached_property
    def _datamodels(self) -> tuple[np.ndarray, np.ndarray, Any]:
        if self.datamodels_dir is None:
            raise ApiError(f"{self.store.where()} has no datamodels; run stage=fit")
        try:
            return load_datamodels(self.store, self.datamodels_dir, self.n_targets)
        except FileNotFoundError as err:
            raise ApiError(f"{err}".replace("run stage=fit first", "run stage=fit")) from None
        except CorruptFile as err:
            raise ApiError(f"{self.store.where(err.rel)} fails verification ({err.reason}); "
                           f"run stage=fit to refit it") from None

    def datamodel(self, target: int) -> Datamodel:
        """Weights, bias, λ, non-zeros and validation MSE of the datamodel of `target`."""
        t = self._target(target)
        W, b, table = self._datamodels
        return Datamodel(t, W[t].copy(), float(b[t]), float(table["lam"][t].as_py()), int(table["nnz"][t].as_py()),
                         float(table["val_mse"][t].as_py()))

    def datamodel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weights float32 [T, n], biases float32 [T], λ float64 [T]) of every target's datamodel."""
        W, b, table = self._datamodels
        return W, b, table["lam"].to_numpy()

    def predict(self, mask) -> np.ndarray:
        """Predicted margins [T] of a bool mask [n] (or [m, T] of masks [m, n]): mask @ w + b."""
        X = self._masks(mask)
        W, b, _ = self._datamodels
        pred = X.astype(np.float32) @ W.T.astype(np.float32) + np.asarray(b, np.float32)[None, :]
        return pred[0] if np.ndim(mask) == 1 else pred

    def calibration_scale(self, method: str = "datamodels") -> float:
        """The factor that calibrates `method`'s predicted drops (the sum of its scores over the
        examples removed) to retrained ones: the scale that stage=counterfactual fitted by
        retraining (counterfactual.json). Multiplying every weight by it keeps each target's
        ranking, and so LDS."""
        fit = (self.result("counterfactual").get("fit") or {}).get(method) or {}
        if fit.get("scale") is None:
            raise ApiError(f"method={method!r}: counterfactual.json in {self.store.where()} has no calibration "
                           f"for it; run stage=counterfactual with it among counterfactual.methods")
        return float(fit["scale"])

    # ------------------------------------------------------------------ methods and scores
    @cached_property
    def _score_files(self) -> dict[str, dict[int, str]]:
        """method -> {checkpoints: scores file} that the stored config asks for."""
        from omegaconf import OmegaConf

        if not (self.config.get("baselines") or {}).get("methods"):
            return {}
        return wanted_files(OmegaConf.create(self.config))

    @property
    def methods(self) -> list[str]:
        """"datamodels" (when fit), then every baseline whose scores are in the store."""
        out = ["datamodels"] if self.datamodels_dir is not None else []
        for method, files in sorted(self._score_files.items()):
            if self.store.exists(files[max(files)]):
                out.append(method)
        return out

    def scores(self, method: str, checkpoints: int | None = None) -> np.ndarray:
        """A method's scores [n, T] (training example × target); `checkpoints` picks one of a
        checkpoint ensemble's budgets (baselines.budget_checkpoints). "datamodels" gives the
        datamodels' weights, transposed to the same shape."""
        return self._weights(method, checkpoints).T

    def _weights(self, method: str, checkpoints: int | None = None) -> np.ndarray:
        """[T, n]: the datamodels' weights, or a baseline's scores transposed."""
        if method == "datamodels" and checkpoints is None:
            return self._datamodels[0]
        present = self.methods
        if method not in present or method == "datamodels":
            raise ApiError(f"method={method!r} has no scores in {self.store.where()}; it has {present}")
        files = self._score_files[method]
        k = max(files) if checkpoints is None else checkpoints
        if k not in files:
            raise ApiError(f"checkpoints={k}: {method} was scored with {sorted(files)} checkpoints; pick one of those")
        return self._read_scores(files[k], f"{method} with {k} checkpoints").T

    def _read_scores(self, rel: str, what: str) -> np.ndarray:
        if rel not in self._cache:
            try:
                self._cache[rel] = open_scores(self.store, rel, self.n, self.n_targets, what).read()
            except BaselinesError as err:
                raise ApiError(str(err)) from None
        return self._cache[rel]

    def top(self, target: int, k: int = 10, method: str = "datamodels") -> Top:
        """The k training examples with the most positive and the k with the most negative
        scores of `method` for `target` (ties broken by index, as in top_examples.png)."""
        t = self._target(target)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.n:
            raise ApiError(f"k={k!r}: this experiment has n={self.n} training examples; pick k in 1..{self.n}")
        w = self._weights(method)[t]
        order = np.argsort(w, kind="stable")
        pos, neg = order[::-1][:k], order[:k]
        return Top(t, method, pos, w[pos], neg, w[neg])

    def lds(self, method: str = "datamodels", checkpoints: int | None = None) -> dict:
        """LDS of a method on the eval masks (evaluate.score_method, with the experiment's
        eval.bootstrap and eval.bootstrap_seed): mean, ci95, median, targets (and mse)."""
        X, Y, _ = self.eval_set()
        bias = self._datamodels[1] if method == "datamodels" and checkpoints is None else None
        out, _ = score_method(X, Y, self._weights(method, checkpoints), bias, *self.bootstrap)
        return out

    @property
    def bootstrap(self) -> tuple[int, int]:
        """(resamples, seed) of the bootstrap interval, as the experiment's evaluate used them."""
        ev = self.config.get("eval") or {}
        return int(ev.get("bootstrap", 1000)), int(ev.get("bootstrap_seed", 0))

    # ------------------------------------------------------------------ the ledger
    @cached_property
    def _ledger(self):
        exp = self.config.get("exp") or {}
        ident = Identity(str(self.summary["config_hash"]), float(self.summary["alpha"]), int(exp.get("seed", 0)),
                         self.n, self.n_targets, n_self(self.config.get("task") or {}, self.n))
        masks, ev = self.config.get("masks") or {}, self.config.get("eval") or {}
        try:     # the models the experiment's last run used (masks.n_train, masks.n_eval, eval.replicas)
            use = limits(int(masks["n_train"]), int(masks["n_eval"]), int(ev["replicas"]))
        except (KeyError, TypeError, ValueError):
            raise ApiError(f"{self.store.where(Layout.CONFIG)} lacks masks.n_train, masks.n_eval or "
                           f"eval.replicas; re-run the pipeline to rewrite it") from None
        return _ReadOnlyLedger(self.store, ident, str(self.summary.get("ledger") or Layout.LEDGER), limits=use)

    def ledger(self, mask_set: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masks bool [m, n], margins float32 [m, T], model ids int64 [m]) of every good model
        of `mask_set` ("train" or "eval"), sorted by model id; an eval mask's replicas are rows
        of their own (eval_set() averages them)."""
        sets = self._ledger.sets.names
        if mask_set not in sets:
            raise ApiError(f"mask_set={mask_set!r}: the ledger has mask sets {list(sets)}")
        try:
            d = self._ledger.load(mask_set, n=self.n, n_targets=self.n_targets)
        except LedgerError as err:
            raise ApiError(str(err)) from None
        return bits.unpack(d.packed, self.n), d.margins, d.model_id

    def memorization(self) -> dict:
        """Each training example's memorization from the experiment's train models (task.targets=both):
        memorization_of's numbers, the ones stage=memorization writes."""
        n_boot, seed = self.bootstrap
        try:
            return memorization_of(self._ledger, self._ledger.index(), self.n, n_boot, seed)
        except LedgerError as err:
            raise ApiError(str(err)) from None

    def eval_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(eval masks bool [e, n], replica-averaged margins float32 [e, T], replicas [e]): what LDS is computed on."""
        if "eval_set" not in self._cache:
            try:
                self._cache["eval_set"] = eval_set(self._ledger, self.n, self.n_targets)
            except LedgerError as err:
                raise ApiError(str(err)) from None
        return self._cache["eval_set"]

    # ------------------------------------------------------------------ other stages' results
    def result(self, name: str) -> dict:
        """The JSON result `<name>.json` that a stage wrote into the store (summary, or a later
        stage's, e.g. a counterfactual or brittleness result). Readers that give such a result
        more structure belong beside this one."""
        if not isinstance(name, str) or not NAME.match(name) or ".." in name:
            raise ApiError(f"name={name!r} must be a plain file name without .json (e.g. name='summary')")
        data = _read_json(self.store, f"{name}.json")
        if data is None:
            have = sorted(e.name[:-5] for e in self.store.list("", ".json"))
            raise ApiError(f"name={name!r}: no {name}.json in {self.store.where()} (it has {have}); "
                           f"run the stage that writes it")
        return data

    # ------------------------------------------------------------------ checks
    def _target(self, target) -> int:
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) \
                or not 0 <= target < self.n_targets:
            raise ApiError(f"target={target!r}: this experiment has targets 0..{self.n_targets - 1}")
        return int(target)

    def _masks(self, mask) -> np.ndarray:
        X = np.asarray(mask)
        X2 = X.reshape(1, -1) if X.ndim == 1 else X
        if X2.ndim != 2 or X2.shape[1] != self.n:
            raise ApiError(f"mask has shape {X.shape}: this experiment has n={self.n} training examples; pass a "
                           f"bool mask of length {self.n} (or [m, {self.n}] for m masks)")
        if X2.dtype != bool and not np.isin(X2, (0, 1)).all():
            raise ApiError(f"mask has values other than 0 and 1; pass a bool mask of length {self.n}")
        return X2.astype(bool)


def memorization_of(ledger: Ledger, index, n: int, n_boot: int, seed: int) -> dict:
    """Memorization of each of the n training examples over the good train models of `ledger`
    (its margins on the examples themselves, task.targets=both), read and estimated one block of
    examples at a time: {"margin", "correct"}: each {"value": [n], "ci95": [n, 2]} (the mean
    over models trained with the example minus the mean over those without, with a bootstrap
    interval over models, orchestrator.metrics.memorization), "in_models", "out_models" [n],
    "models" (how many)."""
    from orchestrator.metrics.memorization import memorization
    out: dict = {k: {"value": np.full(n, np.nan), "ci95": np.full((n, 2), np.nan)} for k in ("margin", "correct")}
    out["in_models"], out["out_models"] = np.zeros(n, np.int64), np.zeros(n, np.int64)
    models = 0
    for a, b, X, own, right in self_blocks(ledger, index, n):
        for key, values in (("margin", own), ("correct", right.astype(np.float64))):
            r = memorization(X, values, n_boot=n_boot, seed=seed)
            out[key]["value"][a:b], out[key]["ci95"][a:b] = r["value"], r["ci95"]
        out["in_models"][a:b], out["out_models"][a:b] = r["in_models"], r["out_models"]
        models = len(X)
    out["models"] = models
    return out


def self_blocks(ledger: Ledger, index, n: int):
    """The good train models' margins on the training examples themselves (task.targets=both),
    one ledger block of examples at a time: (a, b, masks bool [m, b - a] of those examples,
    margins float32 [m, b - a], correct bool [m, b - a])."""
    from orchestrator.storage.ledger import MARGIN_BLOCK
    pos, _, _ = ledger.good_models("train", index)
    for a in range(0, n, MARGIN_BLOCK):
        b = min(n, a + MARGIN_BLOCK)
        packed, own, right = ledger.read_self(index, pos, a, b)
        yield a, b, bits.unpack(packed, n)[:, a:b], own, right


class _ReadOnlyLedger(Ledger):
    """The experiment's ledger, verified as the stages verify it, but never changed: a file
    that fails verification is an ApiError naming it, left for the pipeline to quarantine."""

    def quarantine(self, rel: str, reason: str) -> None:
        raise ApiError(f"{self.store.where(rel)} fails verification ({reason}); run the pipeline "
                       f"(stage=train) to quarantine it and retrain its models")
