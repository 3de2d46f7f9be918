"""The Python API over a finished experiment (orchestrator.api) and the interchange with
MadryLab's datamodels-data layout (orchestrator.api.interchange), checked against the Parquet
files read with pyarrow directly and against evaluate's own scoring."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator import api
from orchestrator.api import interchange as I
from orchestrator.metrics.lds import score_method
from tests.conftest import REPO, compose

slow = pytest.mark.slow      # the tests on the module's real experiment (~30 s to run it once)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_local):
    """A small real experiment (digits, an MLP) through every stage: its run directory."""
    from orchestrator import pipeline
    root = tmp_path_factory.mktemp("api")
    over = ["experiment=tiny", "masks.n_train=120", "masks.n_eval=10", "train.epochs=3", "fit.prefixes=[0.5]",
            "baselines.methods=[trak,representer]", "baselines.checkpoints=2", "baselines.budget_checkpoints=[1]",
            "eval.show_targets=0", "tracking.enabled=false"]
    summary = pipeline.run(compose(over, root))
    return summary["experiment_dir"]


@pytest.fixture(scope="module")
def exp(run_dir):
    return api.open(run_dir)


# ----------------------------------------------------------------------------- pyarrow reads
def parquet_datamodels(run_dir, rel_dir):
    """(W [T, n], b [T], lam [T]) from the chunk files, read with pyarrow alone."""
    t = pq.read_table(sorted(glob.glob(os.path.join(run_dir, rel_dir, "chunk-*.parquet"))))
    order = np.argsort(t["target_id"].to_numpy())
    W = np.stack([np.asarray(w, np.float32) for w in t["weights"].to_pylist()])
    return W[order], t["intercept"].to_numpy()[order], t["lam"].to_numpy()[order]


def parquet_ledger(run_dir, mask_set, n):
    """(masks bool, margins, model ids) of a mask set's good models, sorted by (id, replica)."""
    t = pq.read_table(sorted(glob.glob(os.path.join(run_dir, "ledger", "*.parquet"))))
    rows = [r for r in t.to_pylist() if r["mask_set"] == mask_set and not r["failure"]]
    rows.sort(key=lambda r: (r["model_id"], r["replica"]))
    X = np.stack([np.unpackbits(np.frombuffer(r["mask"], np.uint8), count=n, bitorder="little") for r in rows])
    cols = sorted((c for c in t.column_names if c.startswith("margins_")), key=lambda c: int(c.split("_")[1]))
    Y = np.stack([np.concatenate([r[c] for c in cols]) for r in rows]).astype(np.float32)
    return X.astype(bool), Y, np.array([r["model_id"] for r in rows])


# ----------------------------------------------------------------------------- the API
@slow
def test_datamodels_and_predictions_agree_with_the_parquet_files(exp, run_dir):
    W, b, lam = parquet_datamodels(run_dir, exp.summary["fit"]["dir"])
    assert W.shape == (exp.n_targets, exp.n)
    dm = exp.datamodel(7)
    assert dm.weights.dtype == np.float32 and dm.target == 7
    np.testing.assert_array_equal(dm.weights, W[7])
    assert dm.bias == pytest.approx(b[7]) and dm.lam == pytest.approx(lam[7])
    assert dm.nnz == int(np.count_nonzero(W[7]))
    X, _, _ = parquet_ledger(run_dir, "eval", exp.n)
    want = X.astype(np.float32) @ W.T + b
    np.testing.assert_allclose(exp.predict(X), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exp.predict(X[0]), want[0], rtol=1e-5, atol=1e-5)
    assert exp.predict(X[0].astype(int)).shape == (exp.n_targets,)


@slow
def test_top_agrees_with_argsort_of_the_weights_and_the_scores(exp, run_dir):
    W, _, _ = parquet_datamodels(run_dir, exp.summary["fit"]["dir"])
    top = exp.top(3, k=4)
    order = np.argsort(W[3], kind="stable")
    np.testing.assert_array_equal(top.positive, order[::-1][:4])
    np.testing.assert_array_equal(top.negative, order[:4])
    np.testing.assert_array_equal(top.positive_scores, W[3][order[::-1][:4]])
    np.testing.assert_array_equal(top.negative_scores, W[3][order[:4]])
    rel = exp.summary["baselines"]["methods"]["trak"]["file"]
    t = pq.read_table(os.path.join(run_dir, rel))
    blocks = sorted((c for c in t.column_names if c.startswith("scores_")), key=lambda c: int(c.split("_")[1]))
    S = np.concatenate([np.stack([np.asarray(s, np.float32) for s in t[c].to_pylist()]) for c in blocks], 1)  # [n, T]
    np.testing.assert_array_equal(exp.scores("trak"), S)
    top = exp.top(3, k=5, method="trak")
    np.testing.assert_array_equal(top.positive, np.argsort(S[:, 3], kind="stable")[::-1][:5])
    np.testing.assert_array_equal(top.negative, np.argsort(S[:, 3], kind="stable")[:5])
    assert exp.methods == ["datamodels", "representer", "trak"]
    assert exp.scores("trak", checkpoints=1).shape == (exp.n, exp.n_targets)


@slow
def test_ledger_arrays_agree_with_pyarrow_reads(exp, run_dir):
    for mask_set, models in (("train", 120), ("eval", 20)):
        X, Y, ids = exp.ledger(mask_set)
        Xp, Yp, idp = parquet_ledger(run_dir, mask_set, exp.n)
        assert X.dtype == bool and Y.dtype == np.float32 and len(X) == models
        np.testing.assert_array_equal(X, Xp)
        np.testing.assert_array_equal(Y, Yp)
        np.testing.assert_array_equal(ids, idp)


@slow
def test_lds_and_a_prefix_fit_reproduce_the_summary(exp, run_dir):
    assert exp.lds()["mean"] == pytest.approx(exp.summary["lds"]["datamodels"]["mean"], abs=1e-12)
    assert exp.lds("trak")["mean"] == pytest.approx(exp.summary["lds"]["trak"]["mean"], abs=1e-12)
    (m, rel), = exp.summary["fit"]["prefixes"].items()
    prefix = api.open(run_dir, datamodels=rel.split("/")[-1])
    assert prefix.datamodels_dir == rel and len(exp.datamodels_dirs) == 2
    assert prefix.lds()["mean"] == pytest.approx(exp.summary["lds_curve"][str(m)]["mean"], abs=1e-12)
    assert exp.config["masks"]["n_train"] == 120 and exp.result("summary") == exp.summary


@slow
def test_every_bad_input_is_one_line_naming_the_argument(exp, run_dir, tmp_path):
    def refused(fn, *parts):
        with pytest.raises(api.ApiError) as err:
            fn()
        text = str(err.value)
        assert "\n" not in text and all(p in text for p in parts), text
    T, n = exp.n_targets, exp.n
    refused(lambda: exp.datamodel(T), f"target={T}", f"targets 0..{T - 1}")
    refused(lambda: exp.top(0, k=n + 1), f"k={n + 1}", f"n={n}")
    refused(lambda: exp.top(0, k=0), "k=0")
    refused(lambda: exp.scores("tracin"), "method='tracin'", "['datamodels', 'representer', 'trak']")
    refused(lambda: exp.scores("trak", checkpoints=2 + 5), "checkpoints=7", "[1, 2]")
    refused(lambda: exp.predict(np.ones(n - 1, bool)), f"shape ({n - 1},)", f"length {n}")
    refused(lambda: exp.predict(np.full(n, 2)), "values other than 0 and 1")
    refused(lambda: exp.ledger("test"), "mask_set='test'", "['train', 'eval']")
    refused(lambda: exp.result("nope"), "name='nope'", "run the stage that writes it")
    refused(lambda: exp.result("../x"), "name='../x'")
    refused(lambda: api.open(str(tmp_path)), "is not an experiment", "summary.json")
    refused(lambda: api.open(run_dir, datamodels="m9-torch-x"), "datamodels='m9-torch-x'")
    # an experiment whose fit never ran: no datamodels to read
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(run_dir, "config.yaml"), bare)
    summary = {k: v for k, v in exp.summary.items() if k != "fit"}
    (bare / "summary.json").write_text(json.dumps(summary))
    unfit = api.open(str(bare))
    assert unfit.methods == []
    refused(lambda: unfit.datamodel(0), "has no datamodels; run stage=fit")
    refused(lambda: unfit.predict(np.ones(n, bool)), "has no datamodels; run stage=fit")


@slow
def test_the_readme_python_api_example_runs(run_dir, capsys):
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "api.open(" in code
    code = re.sub(r"runs/fmnist_mlp-[0-9a-f]+", run_dir, code)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.count("\n") == 2


# ----------------------------------------------------------------------------- interchange
@slow
def test_export_round_trips_and_evaluates_as_the_experiment(exp, tmp_path):
    out = tmp_path / "export"
    assert I.main(["export", exp.store.uri, str(out)]) == 0
    pub = I.load_published(str(out))
    X, Y, _ = exp.ledger("train")
    Xe, Ye, _ = exp.ledger("eval")
    np.testing.assert_array_equal(pub.train()[0], X)
    np.testing.assert_array_equal(pub.train()[1], Y)
    np.testing.assert_array_equal(pub.eval()[0], Xe)
    np.testing.assert_array_equal(pub.eval()[1], Ye)
    W, b, lam = exp.datamodel_arrays()
    np.testing.assert_array_equal(pub.weight, W.T)
    np.testing.assert_array_equal(pub.bias, b)
    np.testing.assert_array_equal(pub.lam, lam)
    ours = exp.lds()
    for r in (I.evaluate_published(pub, n_boot=exp.bootstrap[0], seed=exp.bootstrap[1]),
              I.evaluate_published(str(out), on=exp)):
        assert r["mean"] == pytest.approx(ours["mean"], abs=1e-12)
        assert r["ci95"] == pytest.approx(ours["ci95"], abs=1e-12)
        assert r["mse"] == pytest.approx(ours["mse"], rel=1e-5)
        assert r["eval_masks"] == 10 and r["eval_models"] == 20


def published_dir(root, n=40, T=6, m=60, e=12, seed=0, margins_dtype=np.float16):
    """Datamodels data written the way MadryLab publishes it (no manifest): planted linear
    margins, masks bool [m + e, n], margins float16, datamodels .pt with weight [n, T]."""
    import torch
    rng = np.random.default_rng(seed)
    masks = rng.random((m + e, n)) < 0.5
    W = rng.normal(size=(n, T)).astype(np.float32)
    b = rng.normal(size=T).astype(np.float32)
    margins = (masks @ W + b + rng.normal(0, 0.5, (m + e, T))).astype(margins_dtype)
    os.makedirs(os.path.join(root, "data"))
    os.makedirs(os.path.join(root, "datamodels"))
    np.save(os.path.join(root, "data", "train_masks_50pct.npy"), masks)
    np.save(os.path.join(root, "data", "test_margins_50pct.npy"), margins)
    noisy = W + rng.normal(0, 0.3, W.shape).astype(np.float32)
    torch.save({"weight": torch.from_numpy(noisy), "bias": torch.from_numpy(b), "lam": torch.full((T,), 0.01)},
               os.path.join(root, "datamodels", "test_50pct.pt"))
    return masks, margins.astype(np.float32), noisy, b


def test_published_files_evaluate_as_our_evaluate_on_the_same_arrays(tmp_path):
    masks, margins, W, b = published_dir(str(tmp_path))
    r = I.evaluate_published(str(tmp_path), eval_rows=12, n_boot=200, seed=3)
    want, _ = score_method(masks[-12:], margins[-12:], W.T, b, 200, 3)
    assert r["mean"] == pytest.approx(want["mean"], abs=1e-12) and r["mean"] > 0.5
    assert r["ci95"] == pytest.approx(want["ci95"], abs=1e-12)
    assert r["mse"] == pytest.approx(want["mse"], rel=1e-6)
    pub = I.load_published(str(tmp_path), pct="50", eval_rows=12)
    assert pub.train()[0].shape == (60, 40) and pub.margins.dtype == np.float32
    # their training store's flat form: masks.npy, margins.npy, datamodels.pt
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(tmp_path / "data" / "train_masks_50pct.npy", flat / "masks.npy")
    shutil.copy(tmp_path / "data" / "test_margins_50pct.npy", flat / "margins.npy")
    shutil.copy(tmp_path / "datamodels" / "test_50pct.pt", flat / "datamodels.pt")
    assert I.evaluate_published(str(flat), eval_rows=12, n_boot=200, seed=3)["mean"] == r["mean"]


def test_replicas_of_one_mask_are_averaged():
    masks = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 1]], bool)
    margins = np.array([[1.0, 2.0], [5.0, 5.0], [3.0, 0.0]], np.float32)
    X, Y, counts = I.average_replicas(masks, margins)
    got = {tuple(x): (tuple(y), c) for x, y, c in zip(X.tolist(), Y.tolist(), counts.tolist())}
    assert got == {(True, False, True): ((2.0, 1.0), 2), (False, True, True): ((5.0, 5.0), 1)}


def test_wrong_shapes_and_missing_settings_are_one_line_naming_the_file(tmp_path):
    import torch

    def refused(parts, **load):
        with pytest.raises(I.InterchangeError) as err:
            I.load_published(str(tmp_path), **load)
        text = str(err.value)
        assert "\n" not in text and all(p in text for p in parts), text

    masks, margins, W, b = published_dir(str(tmp_path))
    refused(["no manifest.json", "eval_rows="])
    refused(["eval_rows=99", "holds 72 models"], eval_rows=99)
    refused(["pct=20", "['50']"], pct="20", eval_rows=12)
    dm = tmp_path / "datamodels" / "test_50pct.pt"
    torch.save({"weight": torch.from_numpy(W.T.copy()), "bias": torch.from_numpy(b)}, dm)
    refused(["datamodels/test_50pct.pt", "shape (6, 40)", "expected (40, 6)"], eval_rows=12)
    torch.save({"weight": torch.from_numpy(W), "bias": torch.zeros(5)}, dm)
    refused(["datamodels/test_50pct.pt", "bias has shape (5,)", "expected (6,)"], eval_rows=12)
    torch.save({"w": torch.from_numpy(W)}, dm)
    refused(["datamodels/test_50pct.pt", "['w']", "'weight'"], eval_rows=12)
    np.save(tmp_path / "data" / "test_margins_50pct.npy", margins[:-1])
    refused(["data/test_margins_50pct.npy", "shape (71, 6)", "expected (72, 6)"], eval_rows=12)
    np.save(tmp_path / "data" / "train_masks_50pct.npy", masks.astype(np.float32))
    refused(["data/train_masks_50pct.npy", "dtype float32", "expected bool"], eval_rows=12)
    with pytest.raises(I.InterchangeError, match="no data/train_masks_<PCT>pct.npy"):
        I.load_published(str(tmp_path / "data"))


@slow
def test_published_datamodels_against_our_eval_set_need_equal_sizes(exp, tmp_path):
    published_dir(str(tmp_path))
    with pytest.raises(I.InterchangeError, match=f"it has n={exp.n}, T={exp.n_targets}, the published "
                                                 f"datamodels n=40, T=6"):
        I.evaluate_published(str(tmp_path), on=exp, eval_rows=12)


def test_the_command_line_prints_the_lds_line_and_refuses_in_one_line(tmp_path):
    published_dir(str(tmp_path))
    from tests.test_cli import outside_repo, user_env
    env, cwd = user_env(), outside_repo(tmp_path)      # as installed: outside the repository, no PYTHONPATH
    ok = subprocess.run([sys.executable, "-m", "orchestrator.api.interchange", "evaluate", str(tmp_path),
                         "--eval-rows", "12"], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert re.fullmatch(r"datamodels \(published\): LDS 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] on 12 eval masks "
                        r"\(12 models\), MSE \d+\.\d{4}\n", ok.stdout), ok.stdout
    bad = subprocess.run([sys.executable, "-m", "orchestrator.api.interchange", "evaluate", str(tmp_path)],
                         capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("interchange: error: ") and "eval_rows" in bad.stderr
