"""stage=leakage, stage=embedding and stage=compare (orchestrator.analyses): the computations on
real digits with planted near-duplicates and on a synthetic W with planted low-rank structure,
then the stages on two small real experiments (digits, an MLP, two recipes) whose training set
holds noisy copies of some targets."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

from orchestrator.analyses import common as analyses_common
from orchestrator.analyses import compare as A_compare
from orchestrator.analyses import embedding as A_embedding
from orchestrator.analyses import leakage as A_leakage
from orchestrator.errors import ConfigError
from orchestrator.metrics import geometry as A
from orchestrator.plots import analyses as AP
from orchestrator.settings import schema as AS
from tests.conftest import compose
from workers.tasks import ImageClassificationTask

PLANTED = {3: 17, 8: 150, 21: 299}       # target -> the training position its noisy copy replaces


def plant(x_tr: np.ndarray, x_tg: np.ndarray, planted: dict, seed: int = 0) -> np.ndarray:
    """x_tr with x_tg[t] put at position i for every (t, i) in `planted`: the first an exact copy,
    the others with Gaussian pixel noise (sd 3 of 255) and a brightness/contrast change."""
    x = x_tr.copy()
    rng = np.random.default_rng(seed)
    for j, (t, i) in enumerate(sorted(planted.items())):
        img = x_tg[t].astype(np.float64)
        if j:
            img = 0.9 * img + 12 + rng.normal(0, 3, img.shape)
        x[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return x


class LeakyDigits(ImageClassificationTask):
    """The digits task with copies of some targets, with their labels, in its training set
    (PLANTED): the test-set leakage that the leakage stage should find."""

    def arrays(self):
        if self._arrays is None:
            x_tr, y_tr, x_tg, y_tg, k = super().arrays()
            y_tr = y_tr.copy()
            for t, i in PLANTED.items():
                y_tr[i] = y_tg[t]
            self._arrays = (plant(x_tr, x_tg, PLANTED), y_tr, x_tg, y_tg, k)
        return self._arrays


def digits(n=300, T=50):
    from workers import data as D
    return D.select(D.load_dataset("digits", None), n, T, seed=0)


# ----------------------------------------------------------------------------- settings

def test_settings_are_checked_in_one_line():
    conf = AS.make_conf(AS.LeakageConf, {"top": 3, "threshold": 0.99}, "leakage")
    assert (conf.top, conf.threshold, conf.neighbours) == (3, 0.99, 5)
    for cls, section, bad, match in [
        (AS.LeakageConf, "leakage", {"top": 0}, r"leakage.top=0 must be an integer >= 1"),
        (AS.LeakageConf, "leakage", {"threshold": 1.5}, r"leakage.threshold=1.5 must be a number in \[-1.0, 1.0\]"),
        (AS.LeakageConf, "leakage", {"nearest": 3}, r"leakage.nearest is not a setting of stage=leakage"),
        (AS.EmbeddingConf, "embedding", {"components": -1}, r"embedding.components=-1"),
        (AS.CompareConf, "compare", {"show": "x"}, r"compare.show='x' must be an integer"),
    ]:
        with pytest.raises(ConfigError, match=match) as err:
            AS.make_conf(cls, bad, section)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- leakage

def test_nearest_in_blocks_equals_the_dense_search():
    x_tr, _, x_tg, _ = digits(300, 50)
    sims, ids = A.nearest(x_tg, x_tr, 4, block=16, device="cpu")
    u = lambda x: (lambda v: v / np.linalg.norm(v, axis=1, keepdims=True))(
        x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(1, keepdims=True))
    S = u(x_tg.astype(np.float64)) @ u(x_tr.astype(np.float64)).T
    assert np.allclose(sims, -np.sort(-S, axis=1)[:, :4], atol=1e-5)
    assert np.allclose(np.take_along_axis(S, ids, 1), sims, atol=1e-5)


def test_planted_near_duplicates_are_flagged_and_nothing_else():
    x_tr, _, x_tg, _ = digits(300, 50)
    x_leaky = plant(x_tr, x_tg, PLANTED)
    rng = np.random.default_rng(0)
    W = rng.normal(0, 0.01, (50, 300)).astype(np.float32)
    W[3, 17], W[8, 150] = 1.0, -0.5              # one copy is the top weight, one is negative
    conf = AS.LeakageConf(top=5, neighbours=3, device="cpu")
    res = A_leakage.find_leakage(x_leaky, x_tg, W, conf)
    p = res["pairs"]
    assert dict(zip(p["target"].tolist(), p["train_id"].tolist())) == PLANTED and len(p["target"]) == 3
    assert (p["neighbour"] == 1).all() and p["similarity"].min() > 0.99 > res["threshold"]
    assert p["similarity"][p["target"] == 3][0] == pytest.approx(1.0, abs=1e-5)     # the exact copy
    ranks = dict(zip(p["target"].tolist(), p["rank"].tolist()))
    assert ranks[3] == 1 and ranks[8] == 300
    assert ranks[21] == 1 + int((W[21] > W[21, 299]).sum())
    assert res["top1_is_nearest"] >= 1 and res["nearest_in_top"] >= res["top1_is_nearest"]
    # the same data without the copies: nothing is flagged, and the rule's threshold stays high
    clean = A_leakage.find_leakage(x_tr, x_tg, W, conf)
    assert len(clean["pairs"]["target"]) == 0 and clean["threshold"] > clean["nearest_similarity"].max()


def test_robust_threshold_is_an_outlier_rule_of_the_nearest_similarities():
    s = 1 - np.exp(np.random.default_rng(0).normal(np.log(0.1), 0.3, 500))     # typical: 1 - s ≈ 0.1
    thr = A.robust_threshold(s, 4.0)
    assert 1 - np.exp(np.log(0.1) - 4 * 0.3) == pytest.approx(thr, abs=2e-3)
    # 4% copies (s = 1) barely move it: the median and the MAD are robust
    assert A.robust_threshold(np.concatenate([s, np.ones(20)]), 4.0) == pytest.approx(thr, abs=5e-3)


# ----------------------------------------------------------------------------- embedding

def test_pca_recovers_planted_low_rank_structure():
    rng = np.random.default_rng(0)
    T, n = 300, 400
    V = np.linalg.qr(rng.normal(size=(n, 3)))[0].T                   # 3 orthonormal directions
    group = np.repeat(np.arange(3), T // 3)
    W = V[group] + rng.normal(0, 0.01, (T, n))
    W *= rng.uniform(0.1, 10, (T, 1))                                  # row scale: removed by the unit norm
    proj, evr = A.pca(W, 20)
    assert proj.shape == (T, 20) and evr.shape == (20,)
    assert evr[:2].sum() > 0.9 and evr[2] < 0.02 and np.all(np.diff(evr) <= 1e-12)
    # the reference: numpy's SVD of the same normalised, centred matrix
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    U = U - U.mean(0)
    s = np.linalg.svd(U, compute_uv=False)
    assert np.allclose(evr, s[:20] ** 2 / (s ** 2).sum(), atol=1e-5)
    # three groups (centred: a plane): each end of PC1 and PC2 is one group only
    ends = A.extremes(proj[:, :2], 10)
    for c in range(2):
        for end in ("high", "low"):
            assert len(set(group[ends[end][c]])) == 1
        assert group[ends["high"][c][0]] != group[ends["low"][c][0]]
        assert proj[ends["high"][c][0], c] == proj[:, c].max() > 0 > proj[:, c].min()
    # above 1000 rows and columns: the randomized SVD, same leading spectrum
    big = np.concatenate([W] + [W + rng.normal(0, 0.02, W.shape)] * 6)          # 2100 x 400: still exact
    assert np.allclose(A.pca(big, 5)[1][:2], A.pca(np.tile(big, (1, 6)), 5)[1][:2], atol=0.01)


def test_cosine_and_top_overlap():
    a = np.array([[1.0, 0, 2], [0, 0, 0], [1, 1, 0]])
    b = np.array([[2.0, 0, 4], [1, 0, 0], [-1, -1, 0]])
    c = A.cosine_rows(a, b)
    assert c[0] == pytest.approx(1) and np.isnan(c[1]) and c[2] == pytest.approx(-1)
    assert A.top_overlap(a, b, 1).tolist() == [1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- the stages

def overrides(epochs: int) -> list[str]:
    return ["experiment=tiny", "task._target_=tests.test_analysis.LeakyDigits", "baselines.methods=[]",
            "train.checkpoints=1", "fit.prefixes=[]", f"train.epochs={epochs}", "exp.name=leaky"]


@pytest.fixture(scope="module")
def two_recipes(tmp_path_factory, ray_local):
    """Two small real experiments on the leaky digits task (8 and 3 epochs): (root, plans)."""
    from orchestrator import pipeline
    from orchestrator.runtime.plan import validate
    root = tmp_path_factory.mktemp("analysis")
    plans = []
    for epochs in (8, 3):
        cfg = compose(overrides(epochs), root)
        pipeline.run(cfg)
        plans.append(validate(cfg))
    return root, plans


def context(plan, tmp_path):
    from orchestrator.runtime.context import Context
    from orchestrator.tracking import Tracker
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return Context(plan, Tracker(None, "test"), {}, "test", {}, str(scratch))


@pytest.mark.slow
def test_leakage_stage_finds_the_planted_copies(two_recipes, tmp_path):
    _, (plan, _) = two_recipes
    out = A_leakage.leakage_stage(context(plan, tmp_path), {"device": "cpu"})
    assert out["targets"] == 50 and out["flagged_pairs"] == 3 and out["flagged_targets"] == 3
    assert out["flagged_in_top"] == 3          # each copy is among its target's 5 largest weights
    store = plan.store
    table = json.loads(store.read_bytes("leakage.json"))
    assert {(r["target"], r["train_id"]) for r in table["pairs"]} == set(PLANTED.items())
    rows = list(csv.DictReader(io.StringIO(store.read_bytes("leakage_pairs.csv").decode())))
    assert {(int(r["target"]), int(r["train_id"])) for r in rows} == set(PLANTED.items())
    assert all(float(r["similarity"]) > out["threshold"] for r in rows)
    assert store.exists("leakage_pairs.png") and store.exists("leakage_top.png")
    print("leakage:", {k: out[k] for k in ("threshold", "nearest_similarity", "top1_is_nearest", "nearest_in_top",
                                            "flagged_in_top")}, [(r["target"], r["weight"], r["rank"]) for r in rows])


@pytest.mark.slow
def test_embedding_stage_on_a_real_experiment(two_recipes, tmp_path):
    _, (plan, _) = two_recipes
    out = A_embedding.embedding_stage(context(plan, tmp_path), {"device": "cpu", "extremes": 4})
    evr = np.array(out["explained_variance_ratio"])
    assert len(evr) == 20 and np.all(np.diff(evr) <= 1e-9) and 0 < evr.sum() <= 1 + 1e-9
    feats = np.array(out["features_explained_variance_ratio"])
    assert len(feats) == 20 and 0 < feats.sum() <= 1 + 1e-9          # 32 hidden units, 50 targets
    assert len(out["components"]) == 3
    for comp in out["components"]:
        for end in ("high", "low"):
            assert len(comp[end]["targets"]) == 4 and sum(comp[end]["classes"].values()) == 4
    assert plan.store.exists("embedding_extremes.png") and plan.store.exists("embedding_spectrum.png")
    print("embedding:", np.round(evr[:5], 3), np.round(feats[:5], 3),
          [(c["high"]["classes"], c["low"]["classes"]) for c in out["components"]])
    with pytest.raises(analyses_common.AnalysisError,
                       match=r"embedding.checkpoint=5: no checkpoint .* train.checkpoints>=6"):
        A_embedding.embedding_stage(context(plan, tmp_path), {"device": "cpu", "checkpoint": 5})


@pytest.mark.slow
def test_compare_stage_and_its_bad_inputs(two_recipes, tmp_path):
    root, (plan_a, plan_b) = two_recipes
    other = plan_b.store.where()
    out = A_compare.compare_stage(context(plan_a, tmp_path), {"other": other, "show": 3})
    c = out["cosine"]
    assert out["targets"] == 50 and -1 <= c["q00"] <= c["median"] <= c["q100"] <= 1 and c["mean"] > 0.2
    assert [d["cosine"] for d in out["disagree_most"]] == sorted(d["cosine"] for d in out["disagree_most"])
    assert out["disagree_most"][0]["cosine"] == pytest.approx(c["q00"])
    per = json.loads(plan_a.store.read_bytes("compare.json"))["per_target"]["cosine"]
    assert len(per) == 50 and plan_a.store.exists("compare.png")
    print("compare:", {k: round(v, 3) for k, v in c.items()}, out["top5_overlap"])

    def refused(other, match):
        with pytest.raises(ConfigError, match=match) as err:
            A_compare.compare_stage(context(plan_a, tmp_path), {"other": other})
        assert "\n" not in str(err.value) and str(err.value).startswith("compare.other")

    refused(None, r"compare.other must be set")
    refused(str(root / "nowhere"), r"compare.other=.*nowhere.*is not an experiment")
    refused(plan_a.store.where(), r"is this experiment itself")
    fewer = root / "fewer"
    shutil.copytree(other, fewer)
    summary = json.loads((fewer / "summary.json").read_text())
    (fewer / "summary.json").write_text(json.dumps({**summary, "n_targets": 40}))
    refused(str(fewer), r"has n=300 training examples and 40 targets, this experiment n=300 and 50")
    unfit = root / "unfit"
    shutil.copytree(other, unfit, ignore=shutil.ignore_patterns("datamodels"))
    (unfit / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "fit"}))
    refused(str(unfit), r"has no datamodels; run stage=fit there")


@pytest.mark.slow
def test_a_bad_compare_other_is_refused_before_ray_and_mlflow(two_recipes, tmp_path):
    from orchestrator import pipeline
    root, _ = two_recipes
    cfg = compose(overrides(8) + ["stage=compare", f"compare.other={root / 'nowhere'}",
                                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], root)
    with pytest.raises(ConfigError, match=r"compare.other=.*nowhere.*is not an experiment"):
        pipeline.run(cfg)
    assert not (tmp_path / "mlflow.db").exists()          # refused before MLflow (and Ray) start


# ----------------------------------------------------------------------------- zero weights, as drawn

def test_zero_weights_are_never_shown_as_largest_weights(tmp_path):
    """A lasso datamodel has few non-zero weights: leakage_top.png and compare.png show only
    the positive ones, with a note where there are fewer than `top`, and the counts of
    leakage.json count only them."""
    x_tr, y_tr, x_tg, y_tg = digits(300, 50)
    W = np.zeros((4, 300), np.float32)
    W[0, [5, 9]] = [0.4, 0.2]                   # two positive weights, the rest zero
    W[1, 7] = -0.3                              # no positive weight at all
    W[3] = np.linspace(1, 2, 300)               # dense: five positive weights
    assert A.positive_top(W, 5)[0].tolist() == [5, 9, -1, -1, -1]
    assert (A.positive_top(W, 5)[1:3] == -1).all() and (A.positive_top(W, 5)[3] >= 0).all()
    conf = AS.LeakageConf(top=5, neighbours=3, device="cpu")
    res = A_leakage.find_leakage(x_tr, x_tg[:4], W, conf)
    assert res["nearest_in_top"] <= 2 and res["top1_is_nearest"] <= 2        # rows 1 and 2 have no top example
    names = [str(i) for i in range(10)]
    rows = [(f"target #{t}", A_leakage._top_cells(t, res, W, x_tr, y_tr, x_tg, y_tg, names)) for t in range(4)]
    captions = [[c[1] for c in cells if c is not None] for _, cells in rows]
    assert [c.split("\n")[0] for c in captions[0][1:3]] == ["+1 " + str(y_tr[5]), "+2 " + str(y_tr[9])]
    assert captions[0][3] == "no more\npositive\nweights" and len(rows[0][1]) == 1 + 5 + 2
    assert captions[1][1] == "no positive\nweight in this\ndatamodel" and captions[2][1] == captions[1][1]
    assert sum(c.startswith("+") for c in captions[3]) == 5
    assert not any("w=+0 " in c or c.endswith("w=+0") or "w=0" in c for cs in captions for c in cs)
    assert all(len(cells) == 8 for _, cells in rows)                          # the nearest column lines up
    report = AP.plot_rows(rows, "Each target, the training examples with its 5 largest positive datamodel weights "
                               "(+k, weight w; zero weights are not shown) and its nearest neighbour in input space",
                         str(tmp_path / "top.png"))
    assert report["overlaps"] == [], report["overlaps"]
    assert "no more\npositive\nweights" in report["texts"]


def test_spectrum_ticks_are_whole_components(tmp_path):
    rep = AP.plot_spectra({"datamodel weights": np.geomspace(0.1, 0.01, 20),
                          "last-layer features (checkpoint 0)": np.geomspace(0.4, 0.001, 20)}, str(tmp_path / "s.png"))
    assert rep["overlaps"] == []
    assert all(t.lstrip("−-").isdigit() for t in rep["ticks"]["x"][0]), rep["ticks"]["x"]
