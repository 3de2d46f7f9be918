"""Config checks and the experiment's identity, before any Ray work starts.

`validate` turns a composed Hydra config into a `Plan` (task, sizes, store) or raises
`ConfigError` with one line naming the setting and the fix. Types, defaults and each
setting's allowed values come from the schema (orchestrator/schema.py, collected in `RULES`);
what needs more than one setting's rule is checked here. `check_outputs` then checks that every place the run
writes (the store, the MLflow store, Hydra's output directory) can be written, still
before Ray starts. The experiment directory is keyed by a hash of what determines the
ledger's contents, so re-running the same experiment finds its ledger and a sweep point
gets its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from orchestrator import schema
from orchestrator.schema import STAGES
from workers.settings import Rule, SettingError, _fmt, rules

__all__ = ["RULES", "STAGES", "ConfigError", "Plan", "Rule", "check_outputs", "check_rules", "validate"]
# Settings that change what a trained model is (and so what the ledger holds). Scheduling
# and speed settings (workers, engine, models_per_step, device, compile, ...) do not.
RECIPE_KEYS = ("epochs", "batch_size", "lr", "lr_peak_epoch", "momentum", "nesterov",
               "weight_decay", "label_smoothing", "flip", "translate", "cutout", "precision")


class ConfigError(SettingError):
    """A user mistake in the config, or an output location that cannot be used: one line,
    naming the setting and the fix."""


# ----------------------------------------------------------------------------- rules
def _positive(example=1, null=False):
    return Rule(int, 1, null=null, example=example)


def _count(example=0):
    return Rule(int, 0, example=example)


SEED = Rule(int, 0, 2 ** 63 - 1, example=0)
# Every setting's allowed values, from the schema's fields (orchestrator/schema.py), plus those
# of the shipped tasks' parameters (task/ is the user's class, so it is not in the schema).
RULES: dict[str, Rule] = {
    **rules(schema.Config),
    "task.n_train": Rule(int, 2, example=1000),
    "task.n_targets": _positive(200),
    "task.subset_seed": SEED,
    "task.model.width": Rule(float, 0, lo_open=True, example=1.0),
}
# Method parameters of the baselines that are numbers (workers.attribution).
BASELINE_PARAM_RULES = {
    "proj_dim": _positive(512), "cg_iters": _positive(30), "hessian_samples": _positive(300),
    "damping": Rule(float, 0, example=0.01), "cg_tol": Rule(float, 0, lo_open=True, example=1e-3),
    "scale": Rule(float, 0, lo_open=True, example=1.0), "recursion_depth": _positive(100),
    "l2": Rule(float, 0, example=0.01), "factor_max_rows": _positive(8192), "target_chunk": _positive(64),
    "max_params": _positive(20000), "lissa_depth": _positive(1000), "lissa_batch": _positive(256),
    "lissa_repeats": _positive(1), "batch_size": _positive(128), "lam": Rule(float, 0, example=0.0),
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")


def check_rules(cfg: DictConfig) -> None:
    """The allowed values of every setting (their types are the schema's, checked when Hydra
    composes the config), then the checks that need more than one value's rule."""
    try:
        _check_values(cfg)
    except ConfigError:
        raise
    except SettingError as err:
        raise ConfigError(str(err)) from None


def schema_error(err: BaseException) -> ConfigError | None:
    """The schema's refusal (a value of the wrong type, a key it does not have), found in a
    composition error's chain, as one line naming the setting, and the config file when one
    holds it; None if the chain holds no such refusal."""
    from omegaconf.errors import ConfigKeyError, ValidationError
    top = str(err).strip()
    where = ""
    if top.startswith("In '") and "'" in top[4:]:      # Hydra names the file being merged
        where = f" (in {top[4:].split(chr(39), 1)[0]}.yaml)"
    seen = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConfigKeyError) and getattr(cur, "full_key", None):
            return ConfigError(f"unknown config key '{cur.full_key}'{where}: check its spelling "
                               f"(`datamodels --cfg job` lists the keys)")
        if isinstance(cur, ValidationError) and cur.full_key:
            key = re.sub(r"\[\d+\]$", "", str(cur.full_key))
            if key in RULES:
                try:
                    RULES[key].check(key, cur.value)
                except SettingError as bad:
                    return ConfigError(f"{bad}{where}")
            lines = str(cur).strip().splitlines()
            what = " ".join(lines[0].split()) if lines else type(cur).__name__
            return ConfigError(f"{key}{where}: {what}; `datamodels --cfg job` shows its type and default")
        cur = cur.__cause__ or cur.__context__
    return None


def _schema_keys(cfg: DictConfig) -> None:
    """A key that `+key=value` added to a typed section, which no code reads: refused."""
    import dataclasses
    for f in dataclasses.fields(schema.Config):
        node = cfg.get(f.name)
        kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if kind is None or not dataclasses.is_dataclass(kind) or not isinstance(node, DictConfig):
            continue
        known = {g.name for g in dataclasses.fields(kind)}
        extra = sorted(set(node.keys()) - known)
        if extra:
            raise ConfigError(f"{f.name}.{extra[0]} is not a setting of {f.name} (orchestrator/schema.py "
                              f"{kind.__name__}): check its spelling, and drop the + that added it")


def _check_values(cfg: DictConfig) -> None:
    _schema_keys(cfg)
    for key, rule in RULES.items():
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            continue
        rule.check(key, OmegaConf.select(cfg, key))
    name = cfg.exp.name
    if not isinstance(name, str) or not NAME.match(name) or ".." in name or len(name) > 100:
        raise ConfigError(f"exp.name={_fmt(name)} must be a plain name (letters, digits, _ . = , + -; no '/' "
                          f"or '..'), e.g. exp.name=fmnist_mlp")
    hidden = OmegaConf.select(cfg, "task.model.hidden", default=None)
    if hidden is not None:
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ConfigError(f"task.model.hidden={list(hidden)} must be a list of positive widths, "
                              f"e.g. task.model.hidden=[64]")
    prefixes = OmegaConf.select(cfg, "fit.prefixes", default=None) or []
    for f in prefixes:
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f < 1:
            raise ConfigError(f"fit.prefixes={list(prefixes)} must hold fractions in (0, 1), "
                              f"e.g. fit.prefixes=[0.25,0.5]")
    params = OmegaConf.to_container(cfg.baselines.params, resolve=True) if cfg.baselines.get("params") else {}
    for method, p in (params or {}).items():
        for key, value in (p or {}).items():
            if key in BASELINE_PARAM_RULES:
                BASELINE_PARAM_RULES[key].check(f"baselines.params.{method}.{key}", value)
    for key in ("train.device", "fit.device"):
        dev = OmegaConf.select(cfg, key, default=None)
        if dev is not None and not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", str(dev)):
            raise ConfigError(f"{key}={_fmt(dev)} is not auto|cpu|cuda|cuda:N|mps")


def _local_gpus(cfg: DictConfig) -> int | None:
    """GPUs a local Ray instance would have (None when joining a cluster: not known here)."""
    if cfg.cluster.get("address") or os.environ.get("RAY_ADDRESS"):
        return None
    if cfg.cluster.get("num_gpus") is not None:
        return int(cfg.cluster.num_gpus)
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def check_devices(cfg: DictConfig) -> None:
    """GPU requests that a local instance could never satisfy are refused here, not left
    pending forever in Ray."""
    wanted = {k: float(OmegaConf.select(cfg, k) or 0) for k in
              ("train.gpus_per_worker", "fit.gpus_per_task", "baselines.gpus_per_task")}
    cuda_dev = {k: OmegaConf.select(cfg, k) for k in ("train.device", "fit.device")}
    if not any(wanted.values()) and not any(str(v).startswith("cuda") for v in cuda_dev.values()):
        return
    gpus = _local_gpus(cfg)
    if gpus is None:
        return
    for key, value in wanted.items():
        if value > gpus:
            raise ConfigError(f"{key}={value:g} but this machine has {gpus} GPU(s) for a local run; "
                              f"set {key}=0 or run on a cluster with GPUs (cluster.address)")
    for key, value in cuda_dev.items():
        if str(value).startswith("cuda") and gpus == 0:
            raise ConfigError(f"{key}={value} but this machine has no GPU; set {key}=cpu (or auto)")


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    cfg: DictConfig
    task: Any
    n: int
    n_targets: int
    exp_uri: str                 # where the experiment lives (local path or URI)
    config_hash: str
    tracking_uri: str | None
    store: Any = None            # orchestrator.store.Store of exp_uri
    ledger: Any = None           # orchestrator.ledger.Ledger, verified against `identity`
    handle: Any = None           # StoreHandle for tasks (set once Ray is connected)
    claims: Any = None           # orchestrator.claims.Claims (set by the pipeline)
    artifact_root: str | None = None   # tracking.artifact_root as a URI (file:// for a local path)
    models_per_unit: int | None = None  # the experiment's unit size (orchestrator.experiment.check)
    marker: dict | None = None          # the directory's experiment.json, as check found it

    @property
    def identity(self):
        from orchestrator.ledger import Identity
        return Identity(self.config_hash, float(self.cfg.masks.alpha), int(self.cfg.exp.seed), self.n,
                        self.n_targets)


def ledger_identity(cfg: DictConfig) -> dict:
    """The config parts that define the ledger's rows (not how many, not how fast)."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    task.get("data", {}).pop("root", None)
    return {
        "task": task,
        "recipe": {k: _as_hashed(k, cfg.train.get(k)) for k in RECIPE_KEYS},
        "alpha": float(cfg.masks.alpha),
        "seed": int(cfg.exp.seed),
    }


def _as_hashed(key: str, value):
    """A recipe value as the hash sees it. The presets wrote lr_peak_epoch as an integer before
    the schema typed it as a float: an integral value is hashed as that integer, so that the
    experiments written before keep their directory (and 4 and 4.0 are one experiment)."""
    if key == "lr_peak_epoch" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(ledger_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def store_setting(cfg: DictConfig) -> tuple[str, str]:
    """(the setting that places the experiment, its value): exp.dir, store.uri or exp.root."""
    for key in ("exp.dir", "store.uri"):
        value = OmegaConf.select(cfg, key, default=None)
        if value:
            return key, str(value)
    return "exp.root", str(OmegaConf.select(cfg, "exp.root", default=None))


def experiment_uri(cfg: DictConfig, chash: str) -> str:
    """exp.dir if set, else <store.uri or exp.root>/<exp.name>-<hash>. A value that is neither
    a local path nor a store URI (`store.uri_problem`: `s3://` without a bucket, an unknown
    scheme, a Windows path, ...) is a ConfigError naming its setting, never taken for a local
    path; exp.root, where Hydra's logs go too, must be a local directory."""
    from orchestrator import store as S
    root = OmegaConf.select(cfg, "exp.root", default=None)
    problem = "is not set; give a local directory, e.g. exp.root=runs" if root is None else S.uri_problem(str(root))
    if problem is None and S.uri_scheme(str(root)) is not None:
        problem = ("must be a local directory (Hydra's logs go there too); put the experiments on an object store "
                   "with store.uri=s3://BUCKET/prefix")
    if problem:
        raise ConfigError(f"exp.root={S.redact(str(root))} {problem}")
    key, value = store_setting(cfg)
    problem = S.uri_problem(value)
    if problem:
        raise ConfigError(f"{key}={S.redact(value)} {problem}")
    if key == "exp.dir":
        return value
    return S.join(value, f"{cfg.exp.name}-{chash}")


def _number(cfg, key: str, kind=float):
    value = OmegaConf.select(cfg, key)
    try:
        if isinstance(value, bool):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a {kind.__name__}; set {key}=<{kind.__name__}>") from None


def _task_error(target, err: BaseException) -> str:
    """Why task._target_ could not be built, from the deepest error of the chain (Hydra wraps
    the user's own error, or the import's, in its InstantiationException)."""
    seen, cur = set(), err
    while (cur.__cause__ or cur.__context__) is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in str(cur).strip().splitlines() if ln.strip()]
    why = f"{type(cur).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if isinstance(cur, ImportError):
        return (f"task._target_={target}: cannot import it ({why}); put its module in the directory you run "
                f"from or on PYTHONPATH, or install it")
    return f"task: cannot build {target!r}: {why}"


def validate(cfg: DictConfig, check_data: bool = True) -> Plan:
    """Check the config and the task's data; build nothing remote, write nothing."""
    from hydra.utils import instantiate

    from orchestrator import store as S
    check_rules(cfg)
    if OmegaConf.select(cfg, "baselines") is not None:
        from orchestrator.baselines_stage import budget_sizes
        budget_sizes(cfg)          # a malformed baselines.budget_checkpoints, before any work
    alpha = _number(cfg, "masks.alpha")
    methods = list(cfg.baselines.get("methods") or [])
    if methods:
        from workers.attribution import METHODS
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"baselines.methods: {unknown[0]!r} is not one of {sorted(METHODS)}")
        from workers.attribution import check_params
        params = OmegaConf.to_container(cfg.baselines.params, resolve=True) if cfg.baselines.get("params") else {}
        for m in methods:
            try:
                check_params(m, (params or {}).get(m))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if _number(cfg, "baselines.checkpoints", int) < 1:
            raise ConfigError("baselines.checkpoints must be at least 1 when baselines.methods is not empty")
        if _number(cfg, "baselines.checkpoints", int) > _number(cfg, "masks.n_train", int):
            raise ConfigError("baselines.checkpoints must not exceed masks.n_train")
    if cfg.stage in ("all", "evaluate") and int(cfg.masks.n_eval) < 3:
        raise ConfigError(f"masks.n_eval={cfg.masks.n_eval}: LDS needs at least 3 eval masks (e.g. masks.n_eval=100)")
    if cfg.train.get("loader", "resident") == "ffcv":
        from workers import ffcv_loader
        if not ffcv_loader.available():
            raise ConfigError(f"train.loader=ffcv needs the optional ffcv extra: {ffcv_loader.INSTALL_HINT}; "
                              "or use train.loader=resident")
    check_devices(cfg)

    try:
        task = instantiate(cfg.task, _convert_="all")
    except Exception as err:  # noqa: BLE001 - user classes can raise anything
        raise ConfigError(_task_error(cfg.task.get("_target_"), err)) from None
    if check_data:
        try:
            task.check()
        except ValueError as err:
            raise ConfigError(str(err).strip().splitlines()[0]) from None
    n, n_targets = int(task.n), int(task.n_targets)
    k = round(alpha * n)
    if not 1 <= k < n:
        raise ConfigError(f"masks.alpha={alpha} gives {k} of {n} training examples per mask; "
                          f"raise masks.alpha or task.n_train")

    if cfg.stage in ("counterfactual", "brittleness"):
        from orchestrator.counterfactual import check_settings
        check_settings(cfg, n, n_targets)

    chash = config_hash(cfg)
    uri = experiment_uri(cfg, chash)
    try:
        store = S.Store(uri, float(cfg.store.retry_seconds))
    except S.StoreError as err:
        key, value = store_setting(cfg)
        raise ConfigError(f"{key}={S.redact(value)}: {err}") from None
    tracking = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if not cfg.tracking.enabled:
        tracking = None
    from orchestrator.ledger import Ledger, limits
    plan = Plan(cfg, task, n, n_targets, uri, chash, tracking, store)
    plan.ledger = Ledger(store, plan.identity,
                         limits=limits(int(cfg.masks.n_train), int(cfg.masks.n_eval), int(cfg.eval.replicas)))
    root = cfg.tracking.get("artifact_root")
    if root:
        root = str(root)
        plan.artifact_root = root if "://" in root else "file://" + os.path.abspath(root)
    return plan


def _writable_dir(path: str) -> str | None:
    """None if `path` (a directory, created or not yet) can be written; else why not. Found
    out by doing it: a missing directory is created (what the setting names, and no more)
    and removed again with the parents this made, an existing one gets a hidden file that
    is deleted again; permissions alone do not tell (root may write anywhere, yet nothing
    can be created under /proc)."""
    import tempfile
    path = os.path.abspath(path)
    probe, missing = path, []
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    try:
        st = os.statvfs(probe)
        if st.f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only file system"
    except OSError:
        pass
    try:
        if missing:
            os.makedirs(path)
        else:
            fd, tmp = tempfile.mkstemp(prefix=".datamodels-probe-", dir=path)
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        what = err.filename or path
        return f"{what} cannot be {'created' if missing else 'written'} ({err.strerror or err})"
    finally:
        for made in missing:            # deepest first; stop at one that is not empty (another writer)
            try:
                os.rmdir(made)
            except OSError:
                break
    return None


def _selected(cfg: DictConfig) -> list:
    from orchestrator import stages
    return stages.selected(str(cfg.stage))


def check_outputs(plan: Plan, hydra_dir: str | None = None) -> None:
    """Every place this run will write can be written: the store (a probe object, written,
    read back and deleted), the MLflow store, and Hydra's output directory; a cluster to join
    answers (raycluster.check_address, when a stage needs Ray); the stage's inputs are there
    (stages.check_inputs). One line each."""
    from orchestrator import store as S
    cfg = plan.cfg
    if plan.tracking_uri:      # first: these checks write nothing (the store's probe below does)
        from orchestrator.tracking import TrackingError, absolute_uri, check_reachable, check_uri
        try:            # a URI MLflow cannot open is a mistake in the setting, whatever tracking.required says
            check_uri(plan.tracking_uri)
        except TrackingError as err:
            raise ConfigError(f"tracking.uri={err}, or set tracking.enabled=false") from None
        plan.tracking_uri = absolute_uri(plan.tracking_uri)    # the same store from any directory
        try:
            check_reachable(plan.tracking_uri, float(cfg.tracking.timeout_seconds))
        except TrackingError as err:
            if cfg.tracking.required:
                raise ConfigError(f"tracking.uri={err}; or set tracking.enabled=false, or tracking.required=false "
                                  f"to run without it") from None
            import logging
            logging.getLogger(__name__).warning("tracking.uri=%s; running without tracking (tracking.required=false)",
                                                err)
            plan.tracking_uri = None
    key, value = store_setting(cfg)
    if any(st.needs_ray for st in _selected(cfg)):       # before anything is written
        from orchestrator import raycluster
        raycluster.check_address(cfg.cluster)
    try:
        plan.store.probe()
    except S.StoreError as err:
        raise ConfigError(f"{key}={S.redact(value)}: {str(err).replace('set store.uri', f'set {key}')}") from None
    if hydra_dir is not None:
        why = _writable_dir(hydra_dir)
        if why:
            raise ConfigError(f"exp.root={cfg.exp.root}: Hydra's output directory {hydra_dir} cannot be written "
                              f"({why}); set exp.root to a writable directory")
    from orchestrator import stages
    stages.check_inputs(plan)      # the stage's inputs are there (read-only; before Hydra's or MLflow's writes)
    if plan.tracking_uri and plan.artifact_root and plan.artifact_root.startswith("file://"):
        why = _writable_dir(plan.artifact_root[len("file://"):])
        if why:
            raise ConfigError(f"tracking.artifact_root={cfg.tracking.artifact_root}: cannot be written ({why}); "
                              f"set it to a writable directory, or null for the default beside the MLflow store")
