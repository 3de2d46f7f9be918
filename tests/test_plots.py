"""The evaluate stage's plots, class names, compute accounting, and the checkpoint budgets of
the checkpoint ensembles (TRAK, TracIn): scores of the first k checkpoints taken from one
pass over K equal scoring with k checkpoints directly, on the tiny preset's digits task."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.metrics import compute as E_compute
from orchestrator.plots import evaluate as eval_plots
from orchestrator.plots import style as E
from orchestrator.settings import names
from orchestrator.stages import baselines as baselines_stage
from orchestrator.stages import evaluate as evaluate_stage
from orchestrator.storage import scores as B
from orchestrator.storage.store import Layout, Store
from tests.conftest import compose
from workers import bits

METHODS = ["datamodels", "trak", "tracin", "representer"]


def png_size(path) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def synthetic_results(T=40, seed=0):
    rng = np.random.default_rng(seed)
    results, per_target = {}, {}
    for i, name in enumerate(["tracin", "datamodels", "representer", "trak"]):   # deliberately unordered
        v = np.clip(rng.normal(0.5 - 0.12 * i, 0.15, T), -1, 1)
        v[0] = np.nan                                                       # a constant target
        mean = float(np.nanmean(v))
        results[name] = {"mean": mean, "ci95": [mean - 0.03, mean + 0.03], "targets": T - 1,
                         "seconds": 10.0 * (i + 1), "checkpoints": None if name == "datamodels" else 3}
        per_target[name] = v
    return results, per_target


# --------------------------------------------------------------------------- names and order

def test_class_names_of_the_shipped_datasets():
    fm = E.class_names("fashion_mnist", 10)
    assert fm == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
    assert E.class_names("cifar10", 10) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                            "horse", "ship", "truck"]
    assert E.class_names("digits", 10) == [str(i) for i in range(10)]
    assert E.class_names("my_own_data", 3) == ["0", "1", "2"]           # unknown: the integer labels
    assert E.class_names(None, 2) == ["0", "1"]
    assert E.class_names("fashion_mnist", 4) == ["0", "1", "2", "3"]   # not the dataset's class count
    # from a task: its dataset, or its own names where it has them
    from workers.tasks import ImageClassificationTask
    task = ImageClassificationTask.__new__(ImageClassificationTask)     # its names are its dataset's
    task.data_cfg = {"name": "fashion_mnist"}
    assert E.task_class_names(task, 10)[7] == "Sneaker"
    assert E.task_class_names(SimpleNamespace(class_names=["cat", "dog"]), 2) == ["cat", "dog"]
    assert E.task_class_names(object(), 2) == ["0", "1"]
    # every shipped dataset has names
    from workers.data import CLASS_NAMES, DATASETS
    assert set(DATASETS) <= set(CLASS_NAMES)


def test_method_order_is_datamodels_then_alphabetical():
    assert E.method_order(["trak", "if_cg", "datamodels", "representer"]) == [
        "datamodels", "if_cg", "representer", "trak"]
    assert E.method_order(["tracin", "trak"]) == ["tracin", "trak"]
    c = E.method_colors(["trak", "datamodels"])
    assert c == E.method_colors(["datamodels", "trak"]) and c["datamodels"] != c["trak"]


# --------------------------------------------------------------------------- plots

def test_plot_lds_writes_a_readable_png(tmp_path):
    results, per_target = synthetic_results()
    path = tmp_path / "lds.png"
    eval_plots.plot_lds(results, per_target, str(path))
    w, h = png_size(path)
    assert 700 <= w <= 1600 and 300 <= h <= 1200, (w, h)
    assert os.path.getsize(path) > 10_000


def test_plot_lds_vs_compute_with_budget_curves(tmp_path):
    results, _ = synthetic_results()
    curve = {m: {"mean": 0.2 + m / 1000, "ci95": [0.15 + m / 1000, 0.25 + m / 1000], "seconds": m * 0.1}
             for m in (75, 150, 300)}
    budgets = {name: {str(k): {"mean": 0.1 * k, "ci95": [0.1 * k - 0.02, 0.1 * k + 0.02], "seconds": 2.0 * k}
                      for k in (1, 2, 3)} for name in ("trak", "tracin")}
    path = tmp_path / "c.png"
    eval_plots.plot_lds_vs_compute(results, curve, str(path), budgets)
    w, h = png_size(path)
    assert 700 <= w <= 1600 and 400 <= h <= 1200, (w, h)
    assert os.path.getsize(path) > 15_000
    # no curve, no budgets, a method without seconds: still a plot
    results["representer"]["seconds"] = None
    eval_plots.plot_lds_vs_compute(results, {}, str(tmp_path / "d.png"))
    assert os.path.getsize(tmp_path / "d.png") > 10_000


def test_plot_top_examples_with_class_names(tmp_path):
    rng = np.random.default_rng(0)
    n, T = 30, 3
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    target_images = rng.integers(0, 256, (T, 1, 8, 8), dtype=np.uint8)
    weights = {m: rng.normal(size=(T, n)) for m in ("trak", "datamodels")}
    path = tmp_path / "top.png"
    eval_plots.plot_top_examples(weights, images, target_images, [0, 1], str(path), top=5,
                        train_labels=rng.integers(0, 10, n), target_labels=rng.integers(0, 10, T),
                        names=E.class_names("fashion_mnist", 10))
    w, h = png_size(path)
    # 11 image columns of about an inch at 100 dpi; 2 targets x 2 methods rows plus headers
    assert 1100 <= w <= 1800 and 500 <= h <= 900, (w, h)
    assert os.path.getsize(path) > 20_000
    # colour images (CIFAR layout) and no labels at all
    eval_plots.plot_top_examples({"trak": weights["trak"]}, rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
                        rng.integers(0, 256, (T, 3, 8, 8), dtype=np.uint8), [2], str(tmp_path / "rgb.png"), top=3)
    assert png_size(tmp_path / "rgb.png")[0] > 500


# --------------------------------------------------------------------------- budgets on digits

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The tiny preset's task (digits, MLP [32]) and 3 checkpoints of a few full-batch steps."""
    from hydra.utils import instantiate
    cfg = compose(["experiment=tiny"], tmp_path_factory.mktemp("cfg"))
    task = instantiate(cfg.task, _convert_="all")
    model_fn, x_tr, y_tr, x_tg, y_tg = task.attribution_inputs()
    x_tg, y_tg = x_tg[:12], y_tg[:12]
    ckpts = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = model_fn()
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(15 + 10 * seed):
            opt.zero_grad()
            F.cross_entropy(model(x_tr), y_tr).backward()
            opt.step()
        ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return SimpleNamespace(cfg=cfg, task=task, model_fn=model_fn, x_tr=x_tr, y_tr=y_tr, x_tg=x_tg, y_tg=y_tg,
                           ckpts=ckpts)


@pytest.mark.parametrize("method,params", [
    ("trak", {"proj_dim": 64, "dtype": "float64", "device": "cpu"}),
    ("tracin", {"device": "cpu", "lrs": [0.5, 0.3, 0.1]}),
])
def test_budget_scores_equal_scoring_with_k_checkpoints(digits, method, params):
    from workers.attribution import budget_scores, compute_scores
    d = digits
    b = budget_scores(method, d.model_fn, d.ckpts, d.x_tr, d.y_tr, d.x_tg, d.y_tg, params, [1, 2, 3])
    assert sorted(b.scores) == [1, 2, 3] and len(b.checkpoint_seconds) == 3
    for k in (1, 2):
        p = dict(params, lrs=params["lrs"][:k]) if "lrs" in params else params
        direct = compute_scores(method, d.model_fn, d.ckpts[:k], d.x_tr, d.y_tr, d.x_tg, d.y_tg, p)
        np.testing.assert_allclose(b.scores[k], direct, rtol=1e-6, atol=1e-7 * np.abs(direct).max())
        assert not np.allclose(b.scores[k], b.scores[3])               # budgets really differ
    # the full K is exactly compute_scores' result: the LDS of the K file does not move
    full = compute_scores(method, d.model_fn, d.ckpts, d.x_tr, d.y_tr, d.x_tg, d.y_tg, params)
    assert np.array_equal(b.scores[3], full)
    # seconds: checkpoint k's share, cumulative over the budget
    assert all(s > 0 for s in b.checkpoint_seconds)
    assert b.seconds[1] < b.seconds[2] < b.seconds[3]
    assert b.seconds[2] >= sum(b.checkpoint_seconds[:2])
    # a smaller set of budgets stops after its last checkpoint
    only = budget_scores(method, d.model_fn, d.ckpts, d.x_tr, d.y_tr, d.x_tg, d.y_tg, params, [1])
    assert len(only.checkpoint_seconds) == 1 and np.array_equal(only.scores[1], b.scores[1])
    with pytest.raises(ValueError, match="budgets"):
        budget_scores(method, d.model_fn, d.ckpts, d.x_tr, d.y_tr, d.x_tg, d.y_tg, params, [4])


class Handle:
    def __init__(self, store):
        self.store = store

    def open(self):
        return self.store


def test_compute_method_writes_one_file_per_budget(digits, tmp_path):
    """The Ray task body (called here directly): the K file and a file per budget, named as a run
    with baselines.checkpoints=k would name its file, each equal to scoring k checkpoints."""
    from omegaconf import OmegaConf

    from workers.attribution import compute_scores
    from workers.checkpoints import to_bytes
    d = digits
    store = Store(str(tmp_path / "exp"))
    for i, state in enumerate(d.ckpts):
        store.write_bytes(Layout.checkpoint("train", i, 0), to_bytes(state))
    cfg = d.cfg
    assert int(cfg.baselines.checkpoints) == 3 and names.budget_sizes(cfg) == [1, 2]
    files = B.wanted_files(cfg)
    params = OmegaConf.to_container(cfg.baselines.params.trak)
    assert files["trak"] == {k: B.scores_file("trak", params, k) for k in (1, 2, 3)}
    assert files["trak"][3] == B.expected_files(cfg)["trak"]
    assert list(files["representer"]) == [3]                           # not a checkpoint ensemble
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task_cfg["n_targets"] = 12                                         # fewer targets: seconds, not minutes
    from hydra.utils import instantiate
    _, x_tr, y_tr, x_tg, y_tg = instantiate(task_cfg, _convert_="all").attribution_inputs()
    written = baselines_stage.compute_method(task_cfg, "trak", params, 3, files["trak"], 1, Handle(store))
    assert sorted(written) == [1, 2, 3]
    for k in (1, 2, 3):
        S, meta = B.read_scores(store, files["trak"][k])
        assert meta["checkpoints"] == k and len(meta["checkpoint_seconds"]) == k
        assert meta["seconds"] >= sum(meta["checkpoint_seconds"])
        assert ("budget_of" in meta) == (k < 3)
        direct = compute_scores("trak", d.model_fn, d.ckpts[:k], x_tr, y_tr, x_tg, y_tg, params)
        np.testing.assert_allclose(S, direct, rtol=1e-5, atol=1e-6 * np.abs(direct).max())
        assert B.scores_ok(store, files["trak"][k], 300, 12) == meta
    # only a lost budget file: the task scores just the checkpoints it needs, writes only it
    store.delete(files["trak"][1])
    again = baselines_stage.compute_method(task_cfg, "trak", params, 3, {1: files["trak"][1]}, 1, Handle(store))
    assert list(again) == [1] and len(again[1]["checkpoint_seconds"]) == 1
    # a malformed budget list is a config error naming the setting
    from orchestrator.errors import ConfigError
    with pytest.raises(ConfigError, match="baselines.budget_checkpoints"):
        names.budget_sizes(compose(["experiment=tiny", "baselines.budget_checkpoints=[0]"], tmp_path))
    sizes = names.budget_sizes(compose(["experiment=tiny", "baselines.budget_checkpoints=[2,5,1,2]"], tmp_path))
    assert sizes == [1, 2]
    assert B.budget_files(compose(["experiment=tiny", "baselines.budget_checkpoints=[]"], tmp_path)) == {}


# --------------------------------------------------------------------------- evaluate.run

class Tracker:
    def __init__(self):
        self.metrics, self.artifacts = [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((metrics, step))

    def log_artifact(self, path):
        self.artifacts.append(path)


def fake_plan(tmp_path, n=40, T=6, e=12, overrides=()):
    """A plan whose ledger holds e eval masks (2 replicas each) with margins linear in the mask,
    a digits-like task, and the tiny preset's baselines config."""
    cfg = compose(["experiment=tiny", "eval.show_targets=2", *overrides], tmp_path)
    rng = np.random.default_rng(0)
    Wtrue = rng.normal(size=(T, n)).astype(np.float32)
    X = rng.random((e, n)) < 0.5
    margins = np.repeat(X.astype(np.float32) @ Wtrue.T, 2, axis=0) + rng.normal(0, 0.1, (2 * e, T)).astype(np.float32)
    data = SimpleNamespace(model_id=np.repeat(np.arange(e), 2), margins=margins,
                           packed=bits.pack(np.repeat(X, 2, axis=0)))
    ledger = SimpleNamespace(load=lambda *a, **k: data)
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    task = SimpleNamespace(data_cfg={"name": "digits"},
                           arrays=lambda: (images, rng.integers(0, 10, n), images[:T], rng.integers(0, 10, T), 10))
    return SimpleNamespace(cfg=cfg, store=Store(str(tmp_path / "exp")), ledger=ledger, task=task, n=n, config_hash="h0",
                           n_targets=T), Wtrue


def test_evaluate_counts_checkpoint_training_and_draws_budget_curves(tmp_path):
    from orchestrator.storage import datamodels as fit_stage
    plan, Wtrue = fake_plan(tmp_path)
    n, T = plan.n, plan.n_targets
    rng = np.random.default_rng(1)
    from orchestrator.storage.store import Layout
    from workers.lasso.problem import FitResult
    fitted = FitResult.zeros(T, n)
    fitted.weights[:] = Wtrue
    plan.store.write_table(Layout.chunk("dm", 0, T), fit_stage.datamodel_table(np.arange(T), fitted, 7.0))
    files = B.wanted_files(plan.cfg)
    scoring = {}
    for method, by_k in files.items():
        for k, rel in by_k.items():
            S = (Wtrue.T * k / 3 + rng.normal(0, 2.0 / k, (n, T))).astype(np.float32)
            scoring[method, k] = 0.5 * k + (0.1 if method == "trak" else 0.2)
            plan.store.write_table(rel, B.scores_table(S, {"method": method, "params": {}, "checkpoints": k,
                                                           "seconds": scoring[method, k],
                                                           "checkpoint_digests": [f"d{i}" for i in range(k)]}))
    compute = {"models": 300, "per_model": 0.25, "datamodels": 0.25 * 300 + 7.0}
    ev = evaluate_stage.score(plan, Tracker(), "dm", {}, compute)
    assert {"lds", "lds_curve", "method_metrics", "eval_masks", "replicas_mean", "plots", "scratch",
            "lds_budget"} <= set(ev)
    K = 3
    for method in ("trak", "tracin", "representer", "if_cg"):
        r = ev["lds"][method]
        assert r["seconds_parts"] == {"checkpoints": K * 0.25, "scoring": pytest.approx(scoring[method, K])}
        assert r["seconds"] == pytest.approx(K * 0.25 + scoring[method, K])
        assert ev["method_metrics"][method]["compute_seconds"] == pytest.approx(r["seconds"])
    dm = ev["lds"]["datamodels"]
    assert dm["seconds"] == pytest.approx(82.0)
    assert dm["seconds_parts"] == {"training": pytest.approx(75.0), "fitting": pytest.approx(7.0)}
    # budget curves: k × per model + that budget's scoring seconds; the K point is the method's own
    assert set(ev["lds_budget"]) == {"trak", "tracin"}
    for method, curve in ev["lds_budget"].items():
        assert set(curve) == {"1", "2", "3"}
        for k in (1, 2, 3):
            assert curve[str(k)]["seconds"] == pytest.approx(k * 0.25 + scoring[method, k])
            assert curve[str(k)]["seconds_parts"]["checkpoints"] == pytest.approx(k * 0.25)
        assert curve["3"]["mean"] == ev["lds"][method]["mean"]
        assert curve["1"]["mean"] < curve["3"]["mean"]
        assert ev["lds"][method]["budget"] == curve                      # reaches summary.json via lds
    assert set(ev["plots"]) == {"lds", "lds_vs_compute", "top_examples"}
    for rel in ev["plots"].values():
        assert png_size(os.path.join(plan.store.where(), rel))[0] > 500

    # a missing budget file is an error naming the method, like a missing baseline
    plan.store.delete(files["tracin"][2])
    with pytest.raises(B.BaselinesError, match="tracin.*first 2 checkpoints"):
        evaluate_stage.score(plan, Tracker(), "dm", {}, compute)


def test_baseline_compute_parts():
    assert E_compute.baseline_compute(3.0, 5, 2.0) == (13.0, {"checkpoints": 10.0, "scoring": 3.0})
    assert E_compute.baseline_compute(3.0, 5, None) == (None, {"checkpoints": None, "scoring": 3.0})
    assert E_compute.datamodels_compute(100, 0.5, 4.0) == (54.0, {"training": 50.0, "fitting": 4.0})


# --------------------------------------------------------------------------- the stage, resumed

@pytest.mark.slow
def test_a_lost_budget_file_is_rescored_alone(tmp_path, ray_local):
    """Through the pipeline on a small tiny run: the baselines stage writes the K file and a
    file per budget; a lost budget file is scored again alone (the K file is not rewritten);
    evaluate puts the budget curve in summary.json's lds."""
    from orchestrator import pipeline
    over = ["experiment=tiny", "masks.n_train=40", "masks.n_eval=6", "fit.prefixes=[]", "task.n_targets=10",
            "baselines.methods=[trak,representer]", "eval.show_targets=1"]
    s = pipeline.run(compose(over, tmp_path))
    trak = s["baselines"]["methods"]["trak"]
    assert sorted(trak["budgets"]) == [1, 2] and trak["checkpoints"] == 3 and not trak["cached"]
    assert "budgets" not in s["baselines"]["methods"]["representer"]
    assert set(s["lds"]["trak"]["budget"]) == {"1", "2", "3"}
    assert s["lds"]["trak"]["budget"]["3"]["mean"] == s["lds"]["trak"]["mean"]
    parts = s["lds"]["trak"]["seconds_parts"]
    assert parts["checkpoints"] > 0
    assert s["lds"]["trak"]["seconds"] == pytest.approx(parts["checkpoints"] + parts["scoring"])
    assert s["lds"]["trak"]["budget"]["1"]["seconds_parts"]["checkpoints"] == pytest.approx(parts["checkpoints"] / 3)
    root = s["experiment_dir"]
    k3 = os.path.join(root, trak["file"])
    before = os.stat(k3).st_mtime_ns
    os.remove(os.path.join(root, trak["budgets"][1]["file"]))
    with pytest.raises(B.BaselinesError, match="trak.*first 1 checkpoints"):
        pipeline.run(compose(over + ["stage=evaluate"], tmp_path))
    s2 = pipeline.run(compose(over + ["stage=baselines"], tmp_path))
    assert s2["baselines"]["methods"]["trak"]["cached"] and s2["baselines"]["methods"]["representer"]["cached"]
    assert os.stat(k3).st_mtime_ns == before
    S, meta = B.read_scores(Store(root), trak["budgets"][1]["file"])
    assert meta["checkpoints"] == 1 and meta["budget_of"] == 3 and len(meta["checkpoint_seconds"]) == 1
    s3 = pipeline.run(compose(over + ["stage=evaluate"], tmp_path))
    assert s3["lds"]["trak"]["budget"]["1"]["mean"] == pytest.approx(s["lds"]["trak"]["budget"]["1"]["mean"])


# --------------------------------------------------------------------------- the applications' plots, as read

def readable(report: dict) -> list[str]:
    """The texts of a saved plot, after checking what a reader would trip over: no two texts
    overlap, and no tick is written as a power of ten (3×10¹) or in mathtext."""
    assert report["overlaps"] == [], report["overlaps"]
    for text in report["texts"]:
        assert "×10" not in text and "$" not in text and "10^" not in text, text
    return report["texts"]


def drop_rows(names, ks, targets=10):
    rng = np.random.default_rng(0)
    return {m: {str(k): {"actual": float(a), "ci95": [float(a) - 0.5, float(a) + 0.5], "predicted": None,
                         "targets": targets}
                for k, a in zip(ks, np.sort(rng.uniform(0, 8, len(ks))))} for m in names}


def test_counterfactual_drop_plot_ticks_k_plainly_and_tags_points_over_fewer_targets(tmp_path):
    from orchestrator.plots import analyses as CF
    names = E.method_order(["datamodels", "trak", "tracin", "representer", "if_cg", "random"])
    ks = [10, 20, 50]
    rows = drop_rows(names, ks)
    texts = readable(CF.plot_drops(rows, ks, names, E.method_colors(names), str(tmp_path / "d.png"), 20))
    rep = CF.plot_drops(rows, ks, names, E.method_colors(names), str(tmp_path / "d.png"), 20)
    assert rep["ticks"]["x"] == [["10", "20", "50"]]               # no 3×10¹ between 20 and 50
    assert not any(t.startswith("n=") for t in texts)              # every point: all 10 targets
    assert any("mean over 10 targets × 20 masks" in t for t in texts)
    rows["trak"]["50"]["targets"] = 7                              # a target's retrained models all failed
    texts = readable(CF.plot_drops(rows, ks, names, E.method_colors(names), str(tmp_path / "v.png"), 20))
    assert [t for t in texts if t.startswith("n=") and t.endswith("targets")] == ["n=7 targets"]
    w, h = png_size(tmp_path / "v.png")
    assert 700 <= w <= 1200 and 350 <= h <= 700, (w, h)
    # many ks: every tick a plain integer, labels thinned rather than overlapping
    ks = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 50, 100]
    rep = CF.plot_drops(drop_rows(names, ks), ks, names, E.method_colors(names), str(tmp_path / "m.png"), 20)
    readable(rep)
    labels = rep["ticks"]["x"][0]
    assert labels[0] == "1" and labels[-1] == "100" and all(s.isdigit() for s in labels) and len(labels) >= 5


def test_counterfactual_calibration_plot_gives_slopes_in_significant_digits(tmp_path):
    from orchestrator.analyses import counterfactual as CF_counterfactual
    from orchestrator.plots import analyses as CF
    names = E.method_order(["datamodels", "trak", "tracin", "representer", "if_cg", "random"])
    rng = np.random.default_rng(0)
    scale = {"datamodels": 1.0, "trak": 1.0, "tracin": 700.0, "representer": 0.3, "if_cg": 2.0}
    cells = [{"method": m, "target": t, "k": k, "predicted": float(p), "actual": float(p / scale[m] + rng.normal())}
             for m in scale for t in range(10) for k in (10, 20, 50) for p in [rng.uniform(0.1, 3) * scale[m]]]
    fit = {m: {"correlation": 0.56, "slope": 0.002924 if m == "tracin" else 1.825, "scale": 1.0,
               "held_out_slope": 0.976} for m in scale}
    path = tmp_path / "c.png"
    texts = readable(CF.plot_calibration(cells, fit, names, E.method_colors(names), str(path)))
    titles = [t for t in texts if "slope = " in t]
    assert any(t.startswith("tracin\n") and "slope = 0.00292" in t for t in titles), titles
    assert not any("slope = 0.00 " in t or t.endswith("slope = 0.00") for t in titles)
    assert any("slope = 1.82" in t and "held out: 0.976" in t for t in titles)
    w, h = png_size(path)
    assert w <= 1300 and h <= 900, (w, h)                         # five methods: two rows, not 18 inches
    # the table in the log, too
    out = {"drop": {}, "fit": {"tracin": {**fit["tracin"], "scale": 0.002924}}, "datamodels_minus_random": {}}
    assert "calibration slope = 0.002924" in CF_counterfactual.table_lines(out)[1]


def test_brittleness_plot_shows_both_curves_and_plain_ks(tmp_path):
    from orchestrator.plots import analyses as CF
    ks = [5, 10, 20, 40, 80]
    curve = {str(k): {"predicted": v, "verified": v} for k, v in zip(ks, [0.26, 0.35, 0.41, 0.47, 0.5])}
    rep = CF.plot_brittleness(curve, ks, 34, 10, str(tmp_path / "b.png"))
    texts = readable(rep)
    assert rep["ticks"]["x"] == [["5", "10", "20", "40", "80"]]
    assert any("34 correctly" in t for t in texts)
    assert any(t.startswith("predicted") for t in texts) and any(t.startswith("verified") for t in texts)


def test_lds_vs_models_says_how_many_targets_each_point_averages(tmp_path):
    curve = {m: {"mean": 0.1 + m / 1000, "ci95": [0.05 + m / 1000, 0.15 + m / 1000], "targets": n}
             for m, n in ((38, 35), (75, 39), (150, 50), (300, 50))}
    rep = eval_plots.plot_lds_vs_models(curve, str(tmp_path / "m.png"))
    texts = readable(rep)
    assert rep["ticks"]["x"] == [["38\nn=35", "75\nn=39", "150\nn=50", "300\nn=50"]]
    assert any("n: targets with a defined LDS" in t for t in texts)
    for c in curve.values():
        c["targets"] = 50
    rep = eval_plots.plot_lds_vs_models(curve, str(tmp_path / "m2.png"))
    assert rep["ticks"]["x"] == [["38", "75", "150", "300"]]
    assert "LDS (mean over 50 targets)" in readable(rep)
    # and the datamodels' curve of the compute plot
    results, _ = synthetic_results()
    curve[38]["targets"] = 35
    for m, c in curve.items():
        c["seconds"] = m * 0.1
    texts = readable(eval_plots.plot_lds_vs_compute(results, curve, str(tmp_path / "c.png")))
    assert "m=38, n=35 targets" in texts and "m=300, n=50 targets" in texts


def test_plain_numbers_and_significant_digits():
    assert [E.plain_number(v) for v in (150, 150.0, 0.5, 2000, 1e6)] == ["150", "150", "0.5", "2000", "1000000"]
    assert [E.sig(v) for v in (0.002924, 1.825, 3676.2, 0.0, None, float("nan"), -0.2061)] == [
        "0.00292", "1.82", "3676", "0", "-", "-", "-0.206"]
    assert E.sig(0.5, 2) == "0.50" and E.sig(2.3e-7) == "2.3e-07"


def test_top_examples_never_show_a_zero_score_as_a_top_one(tmp_path):
    rng = np.random.default_rng(0)
    n, T = 30, 2
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    W = np.zeros((T, n))
    W[0, [3, 4]] = [0.5, 0.2]                    # a sparse datamodel: two positive weights, one negative
    W[0, 7] = -0.1
    rep = eval_plots.plot_top_examples({"datamodels": W}, images, images[:T], [0, 1], str(tmp_path / "t.png"), top=5,
                              train_labels=rng.integers(0, 10, n), target_labels=rng.integers(0, 10, T))
    texts = readable(rep)
    scores = [t.split("\n")[1] for t in texts if t.count("\n") == 1 and t.split("\n")[1][:1] in "+-"]
    assert sorted(scores) == ["+0.2", "+0.5", "-0.1"], scores         # no "+0" among the largest
    assert texts.count("no more\npositive\nscores") == 1 and texts.count("no more\nnegative\nscores") == 1
    assert texts.count("no\npositive\nscores") == 1 and texts.count("no\nnegative\nscores") == 1   # target 1
