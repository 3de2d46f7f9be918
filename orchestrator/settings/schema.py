"""The config's schema: Hydra structured configs, the single source of defaults, types and
allowed values of every setting (workers.settings.setting declares a field's rule).

`register()`, run when this module is imported, puts the root in Hydra's ConfigStore as
`base_config`, which conf/config.yaml extends. The groups' YAML files (conf/train/cpu.yaml,
conf/fit/torch.yaml, ...) hold only what differs from these defaults. `task` stays untyped:
a task is the user's class, built from its `_target_`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

from omegaconf import MISSING

from orchestrator.errors import ConfigError
from workers.lasso import LassoConfig
from workers.recipe import TrainConfig
from workers.settings import SettingError, check, setting

STAGES = ("all", "masks", "train", "fit", "baselines", "evaluate", "counterfactual", "brittleness", "leakage",
          "embedding", "compare", "memorization", "mislabel")
SEED_MAX = 2 ** 63 - 1



@dataclass
class LeakageConf:
    """stage=leakage. The measure is the cosine similarity of the centred, normalised pixel
    vectors (each image minus its own mean, over its norm: Pearson's r between two images,
    blind to brightness and contrast, 1 for a copy). `threshold` None: the robust rule of
    `robust_threshold` with `spread`."""
    targets: int = setting(200, lo=1, example=200)            # the first `targets` targets are analysed
    top: int = setting(5, lo=1, example=5)                    # top-weight examples per target
    neighbours: int = setting(5, lo=1, example=5)             # nearest training examples kept per target
    threshold: float | None = setting(None, lo=-1.0, hi=1.0, example=0.98)
    spread: float = setting(4.0, lo=0.0, lo_open=True, example=4.0)
    show: int = setting(24, lo=0, example=24)                 # flagged pairs drawn
    show_targets: int = setting(6, lo=0, example=6)           # targets drawn beside their top examples
    block: int = setting(4096, lo=1, example=4096)            # rows per block of the neighbour search
    device: str = setting("auto", example="cpu")


@dataclass
class EmbeddingConf:
    """stage=embedding: PCA of the unit-norm datamodel weights (and of the targets'
    penultimate features from train checkpoint `checkpoint`, when `features`); all-zero
    datamodels are left out of it."""
    components: int = setting(3, lo=1, example=3)             # leading components drawn and described
    extremes: int = setting(6, lo=1, example=6)               # targets drawn at each end of a component
    spectrum: int = setting(20, lo=1, example=20)             # explained-variance ratios reported
    features: bool = setting(True)
    checkpoint: int = setting(0, lo=0, example=0)
    device: str = setting("auto", example="cpu")


@dataclass
class CompareConf:
    """stage=compare: this experiment's datamodels against those of `other` (its run
    directory or store URI), target by target."""
    other: str | None = setting(None, example="runs/fmnist_mlp-<hash>")
    show: int = setting(4, lo=0, example=4)                   # most-disagreeing targets drawn
    top: int = setting(5, lo=1, example=5)                    # top examples per datamodel drawn and overlapped


@dataclass
class MemorizationConf:
    """stage=memorization (an experiment of task.targets=both): each training example's
    memorization from the trained models; the interval's resamples are eval.bootstrap's."""
    show: int = setting(12, lo=0, example=12)                 # most and least memorized examples drawn, each
    verify: int = setting(0, lo=0, example=20)                # examples checked by retraining (0: none)
    verify_masks: int = setting(20, lo=2, example=20)         # fresh α-masks, each trained with each example toggled
    self_weight: bool = False                                 # also each example's datamodel self-weight (a lasso each)


@dataclass
class MislabelConf:
    """stage=mislabel (an experiment of task.targets=both with task.label_noise): each method's
    ranking of the flipped labels, and the repair check by retraining."""
    methods: list[str] = setting(factory=list)   # []: memorization, self_weight, loss and every baselines.methods
    inspect: int = setting(0, lo=0, example=100)  # k flagged per method for the repair check; 0: as many as flipped
    models: int = setting(20, lo=0, example=20)   # models per repair variant (0: no repair check)
    show: int = setting(12, lo=0, example=12)     # the best method's first flagged examples drawn


def make_conf(cls, settings: dict | None, section: str):
    """The `cls` dataclass of a stage's settings (a plain dict, as the schema gives it), with
    every rule checked: ConfigError naming `<section>.<key>` otherwise."""
    settings = dict(settings or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a setting of stage={section}; its settings are "
                          f"{', '.join(names)}")
    conf = cls(**settings)
    try:
        check(conf, f"{section}.")
    except SettingError as err:
        raise ConfigError(str(err)) from None
    return conf


@dataclass
class TrainConf(TrainConfig):
    """train/: the recipe (workers.recipe.TrainConfig) and how the train stage schedules it."""

    workers: int | None = setting(None, lo=1, example=4)  # persistent training actors; null: as many as fit
    cpus_per_worker: float = setting(1.0, lo=0, lo_open=True, example=1)
    gpus_per_worker: float = setting(0.0, lo=0, example=0)
    models_per_unit: int = setting(100, lo=1, example=100)  # models per work unit (one ledger file each)
    max_in_flight: int = setting(2, lo=1, example=2)   # units queued per worker
    max_retries: int = setting(3, lo=1, hi=100, example=3)  # a unit fails the run after failing on
    #                                                    this many different workers
    max_worker_deaths: int = setting(100, lo=0, example=100)  # workers that may die (and be replaced)
    #                                                    before the run gives up
    unit_timeout_seconds: float | None = setting(None, lo=0, example=600)  # a unit still running this
    #   long is declared lost (a hung worker): its actor is killed and replaced (a worker death) and the
    #   unit retrained on another; null: max(60 s, 5x the median seconds per model so far x the unit's
    #   models), doubled on each retry, none before a first unit finishes; 0: never
    checkpoints: int = setting(0, lo=0, example=0)     # save the weights of the first K train models


@dataclass
class FitConf(LassoConfig):
    """fit/: the lasso per target (workers.lasso.LassoConfig) and the fit stage's Ray tasks."""

    targets_per_task: int = setting(1024, lo=1, example=1024)  # targets per Ray task (one datamodels file each)
    cpus_per_task: float = setting(1.0, lo=0, lo_open=True, example=1)
    gpus_per_task: float | None = setting(None, lo=0, example=0)  # null: 1 if the cluster has GPUs and device != cpu
    # also fit on these fractions of the train models (the LDS-against-models curve)
    prefixes: list[float] = setting(factory=lambda: [0.125, 0.25, 0.5])


@dataclass
class ClusterConf:
    """cluster/: where Ray runs. A null address starts a local instance (or joins RAY_ADDRESS,
    which `ray job submit` sets for the driver)."""

    address: str | None = None
    num_cpus: int | None = setting(None, lo=1, example=2)  # local instance only; null: all cores
    num_gpus: int | None = setting(None, lo=0, example=0)


@dataclass
class ExpConf:
    name: str = "fmnist_mlp"   # MLflow experiment name; also names the experiment directory
    seed: int = setting(0, lo=0, hi=SEED_MAX, example=0)  # derives every mask and every model seed
    root: str = "runs"         # local directory: Hydra's outputs, and the experiments unless store.uri is set
    dir: str | None = None     # pin the experiment's location (a directory or URI) instead of <root>/<name>-<hash>


@dataclass
class MasksConf:
    alpha: float = setting(0.5, lo=0, hi=1, lo_open=True, hi_open=True, example=0.5)  # fraction per mask
    # models trained on `train` masks (datamodel fitting): a number, or auto to train in rounds
    # until a budget rule is met (orchestrator/settings/budget.py checks it: an integer >= 10 or auto)
    n_train: Union[int, str] = 4000  # noqa: UP007 - OmegaConf takes typing.Union, not int | str
    n_eval: int = setting(100, lo=1, example=100)      # held-out `eval` masks (LDS)


@dataclass
class BudgetConf:
    """Training in rounds (masks.n_train=auto, or a number with a rule here): after each round
    the datamodels are fit and scored, and the run stops at the first rule met
    (orchestrator/settings/budget.py). null: the rule is off."""
    lds: float | None = setting(None, lo=0, hi=1, lo_open=True, example=0.85)   # stop once the LDS reaches this
    gain_per_doubling: float | None = setting(None, lo=0, lo_open=True, example=0.005)  # ... gains less per doubling
    models: int | None = setting(None, lo=10, example=8000)     # ... has trained this many train models
    seconds: float | None = setting(None, lo=0, lo_open=True, example=3600)  # ... compute seconds (train + fit)
    first: int = setting(250, lo=10, example=250)               # train models in the first round
    growth: float = setting(2.0, lo=1, lo_open=True, example=2.0)  # each round: the last one's models times this


@dataclass
class EvalConf:
    replicas: int = setting(3, lo=1, example=3)        # independent seeds per eval mask, margins averaged
    show_targets: int = setting(4, lo=0, example=4)    # targets whose top +/- training images are plotted
    bootstrap: int = setting(1000, lo=1, example=1000)  # bootstrap resamples over targets (95% interval)
    bootstrap_seed: int = setting(0, lo=0, hi=SEED_MAX, example=0)


def _baseline_params() -> dict[str, Any]:
    return {"trak": {"proj_dim": 512, "dtype": "float64"}, "tracin": {}, "representer": {},
            "if_cg": {"hessian": "ggn", "damping": 0.1, "cg_iters": 30, "cg_tol": 1.0e-3, "hessian_samples": 300},
            "if_lissa": {"hessian": "ggn", "damping": 0.01}, "if_exact": {"layer": "last"}}


@dataclass
class BaselinesConf:
    """Attribution methods scored by LDS beside the datamodels (workers/attribution), on the
    weights of the first `checkpoints` train-set models (which the train stage saves)."""

    methods: list[str] = setting(factory=lambda: ["trak", "tracin", "representer", "if_cg"])
    checkpoints: int = setting(5, lo=0, example=5)
    # The checkpoint ensembles (trak, tracin) are also scored with their first k checkpoints for
    # each k here below `checkpoints`: the LDS-against-compute curve, from the same pass. [] = only K.
    budget_checkpoints: list[Any] = setting(factory=lambda: [1, 2])
    cpus_per_task: int = setting(1, lo=1, example=1)
    gpus_per_task: float = setting(0.0, lo=0, example=0)
    params: dict[str, Any] = setting(factory=_baseline_params)  # per method (see workers.attribution)


@dataclass
class CounterfactualConf:
    """stage=counterfactual (orchestrator.analyses.counterfactual): each method's top-k training examples
    removed from fresh α-masks, retrained with the same seeds with and without the removal."""

    targets: list[int] = setting(factory=list)   # target ids; []: `n_targets` drawn at random (exp.seed)
    n_targets: int = setting(10, lo=1, example=10)
    ks: list[int] = setting(factory=lambda: [10, 20, 50])   # examples removed (each method's top k)
    masks: int = setting(20, lo=2, example=20)   # fresh α-masks, each trained with and without every removal
    methods: list[str] = setting(factory=list)   # []: datamodels, every baselines.methods, and random


@dataclass
class BrittlenessConf:
    """stage=brittleness: the datamodels' smallest flipping set of each correctly classified
    target (greedy by weight), verified by retraining without it."""

    targets: list[int] = setting(factory=list)   # target ids; []: `n_targets` drawn among the correct ones
    n_targets: int = setting(100, lo=1, example=100)
    ks: list[int] = setting(factory=lambda: [5, 10, 20, 40, 80, 160])   # the grid of removal sizes
    masks: int = setting(10, lo=2, example=10)   # fresh α-masks retrained without each target's set


@dataclass
class StoreConf:
    """Where experiments live: a local directory or s3://bucket/prefix, gs://bucket/prefix. Each
    is <uri>/<exp.name>-<hash>. S3 options go in the query (?endpoint_override=host:port&scheme=http);
    credentials come from the environment."""

    uri: str | None = None     # null: exp.root
    retry_seconds: float = setting(60.0, lo=0, example=60)  # how long a store call is retried (backoff)
    lease_seconds: float = setting(60.0, lo=1, example=60)  # a claim expires this long after its heartbeat


@dataclass
class TrackingConf:
    uri: str | None = None     # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    enabled: bool = setting(True)
    required: bool = setting(True)  # false: an unreachable MLflow store is a warning, the run goes on
    timeout_seconds: float = setting(5.0, lo=0, lo_open=True, example=5)  # how long an MLflow server may take
    artifact_root: str | None = None  # where a new MLflow experiment keeps run artifacts (a directory
    #                                   or s3:// URI); null: beside a sqlite store, else the server's choice


@dataclass
class Config:
    """The root: conf/config.yaml extends it (defaults list: base_config first)."""

    task: Any = MISSING
    train: TrainConf = setting(factory=TrainConf)
    fit: FitConf = setting(factory=FitConf)
    cluster: ClusterConf = setting(factory=ClusterConf)
    stage: str = setting("all", choices=STAGES)
    exp: ExpConf = setting(factory=ExpConf)
    masks: MasksConf = setting(factory=MasksConf)
    budget: BudgetConf = setting(factory=BudgetConf)
    eval: EvalConf = setting(factory=EvalConf)
    baselines: BaselinesConf = setting(factory=BaselinesConf)
    counterfactual: CounterfactualConf = setting(factory=CounterfactualConf)
    brittleness: BrittlenessConf = setting(factory=BrittlenessConf)
    leakage: LeakageConf = setting(factory=LeakageConf)        # orchestrator.analyses
    embedding: EmbeddingConf = setting(factory=EmbeddingConf)
    memorization: MemorizationConf = setting(factory=MemorizationConf)
    mislabel: MislabelConf = setting(factory=MislabelConf)
    compare: CompareConf = setting(factory=CompareConf)
    store: StoreConf = setting(factory=StoreConf)
    tracking: TrackingConf = setting(factory=TrackingConf)


GROUPS = {"train": TrainConf, "fit": FitConf, "cluster": ClusterConf}   # the typed config groups


def register() -> None:
    """Put the root schema in Hydra's ConfigStore as `base_config` (idempotent; done on import,
    as Hydra's structured-config examples do): composing conf/config.yaml needs it. The groups'
    presets merge into its typed nodes (train: TrainConf, fit: FitConf, cluster: ClusterConf),
    so a preset's key that the schema lacks, or a value of the wrong type, is refused."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="base_config", node=Config)


register()
