"""A tiny real experiment (digits, an MLP) through every stage, read back from MLflow, and
looked at in MLflow's own UI with a real browser (Debian's chromium, driven by Playwright)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import pipeline
from tests.conftest import compose

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.slow          # one tiny real run for the module (~20 s) and a browser


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_local):
    """The tiny preset, run once for this module: (its temporary root, summary)."""
    root = tmp_path_factory.mktemp("tiny")
    before = set(os.listdir(os.getcwd()))
    summary = pipeline.run(compose(["experiment=tiny"], root))
    summary["_new_in_cwd"] = sorted(set(os.listdir(os.getcwd())) - before)
    return root, summary


def parent_run(root):
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, exp, parents, children


def test_tiny_real_run_all_stages_tracked(tiny):
    root, summary = tiny
    lds = summary["lds"]["datamodels"]
    assert summary["models"] == {"train": 300, "eval": 60}
    assert lds["mean"] > 0.15, lds            # clearly above zero
    assert lds["ci95"][0] > 0.05
    acc = summary["accuracy"]["train.target_acc"]
    assert acc["mean"] > 0.6                  # the models actually learned digits
    where = summary["experiment_dir"]
    assert os.path.exists(os.path.join(where, "lds.png"))
    # paths in summary.json: relative to experiment_dir, which is absolute
    assert os.path.isabs(where) and summary["ledger"] == "ledger" and summary["train"]["checkpoints"] == "checkpoints"
    for rel in summary["plots"].values():
        assert not os.path.isabs(rel) and os.path.exists(os.path.join(where, rel))

    client, exp, parents, children = parent_run(root)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"     # opens on its runs
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == f"tiny-{summary['config_hash']} α=0.5 m=300"      # the experiment's directory
    stages = {r.data.tags["stage"] for r in children}
    assert {"masks", "train", "fit", "baselines", "evaluate"} <= stages
    assert {s for s in stages if s.startswith("method:")} >= {"method:datamodels", "method:trak"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    tr = [r for r in children if r.data.tags["stage"] == "train"][0]
    hist = client.get_metric_history(tr.info.run_id, "models_done")
    assert max(m.value for m in hist) == 360
    assert parent.data.params["masks.alpha"] == "0.5"
    # the headline is on the parent run: every method's LDS and interval, counts, seconds, plots
    m = parent.data.metrics
    for name, r in summary["lds"].items():
        assert m[f"lds.{name}"] == pytest.approx(r["mean"], abs=1e-12)
        assert (m[f"lds.{name}.ci_lo"], m[f"lds.{name}.ci_hi"]) == pytest.approx(tuple(r["ci95"]), abs=1e-12)
    assert m["models.train"] == 300 and m["models.eval"] == 60 and m["models.failed"] == 0
    assert {"seconds.train", "seconds.fit", "seconds.baselines", "seconds.evaluate"} <= set(m)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "config.yaml", "plots"} <= arts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {f"plots/{os.path.basename(p)}" for p in summary["plots"].values()} <= plots
    # artifacts beside the MLflow store, never in the working directory
    assert parent.info.artifact_uri.startswith(f"file://{root}/mlartifacts/")
    assert summary["_new_in_cwd"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow ui exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s")


def test_mlflow_ui_shows_the_runs_the_headline_and_the_plots(tiny):
    """`mlflow ui` on 127.0.0.1 against the finished run, opened in headless Chromium: the
    experiment opens on its runs, the parent run's page shows every method's LDS and its plot
    artifacts. Screenshots are kept under the run directory (and DATAMODELS_CI_ARTIFACTS)."""
    from playwright.sync_api import sync_playwright

    root, summary = tiny
    _, exp, parents, _ = parent_run(root)
    parent = parents[0]
    shots = os.path.join(summary["experiment_dir"], "ui-screenshots")
    os.makedirs(shots, exist_ok=True)
    port = _free_port()
    log = open(os.path.join(root, "mlflow-ui.log"), "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "ui", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/health", proc, 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # the page the run printed: the parent run with its metrics table, every method's LDS
            link = summary["mlflow"]["page"]
            assert link.startswith(f"#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}?")
            page.goto(f"{base}/{link}")
            page.get_by_text("lds.datamodels", exact=True).first.wait_for(timeout=90_000)
            for name in summary["lds"]:
                assert page.get_by_text(f"lds.{name}", exact=True).count() >= 1, name
            value = f"{summary['lds']['datamodels']['mean']:.4f}"[:5]      # shown rounded
            assert value in page.content()
            page.screenshot(path=os.path.join(shots, "parent_run.png"), full_page=True)
            # its artifacts: the plots folder holds the plots, and one of them renders
            page.goto(f"{base}/{link.replace('?', '/artifacts?')}")
            page.get_by_text("plots", exact=True).first.click(timeout=90_000)
            page.get_by_text("lds.png", exact=True).first.click(timeout=90_000)
            page.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:') "
                                   "&& i.complete && i.naturalWidth > 100)", timeout=90_000)
            page.screenshot(path=os.path.join(shots, "parent_run_plots.png"), full_page=True)
            # the experiment's runs (the model-training view): the parent run listed by its name
            page.goto(f"{base}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
            page.get_by_text(parent.info.run_name).first.wait_for(timeout=90_000)
            assert page.get_by_text("Run Name", exact=True).count() >= 1
            page.screenshot(path=os.path.join(shots, "runs.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()
    keep = os.environ.get("DATAMODELS_CI_ARTIFACTS")
    if keep:
        shutil.copytree(shots, os.path.join(keep, "mlflow-ui"), dirs_exist_ok=True)
    assert sorted(os.listdir(shots)) == ["parent_run.png", "parent_run_plots.png", "runs.png"]


def test_a_vanished_baseline_is_an_error_at_evaluate(tiny):
    """A baseline whose scores vanished is an error at evaluate, never a silent omission."""
    from orchestrator.storage.scores import BaselinesError
    root, summary = tiny
    scores = os.path.join(summary["experiment_dir"], "scores")
    trak = [f for f in os.listdir(scores) if f.startswith("trak-")]
    for f in trak:
        os.remove(os.path.join(scores, f))
    with pytest.raises(BaselinesError, match="trak"):
        pipeline.run(compose(["experiment=tiny", "stage=evaluate"], root))


def test_the_summary_keeps_the_entries_of_stages_that_did_not_run(tiny):
    root, summary = tiny
    again = pipeline.run(compose(["experiment=tiny", "stage=masks"], root))
    def plain(x):
        return json.loads(json.dumps(x, default=float))
    for key in ("train", "fit", "baselines", "lds", "plots"):
        assert plain(again[key]) == plain(summary[key]), key


def test_margins_on_the_training_examples_change_nothing_else(tiny, tmp_path):
    """task.targets=both: a new experiment whose models, targets and LDS are the tiny run's,
    every model (train and eval) with its margins and correctness on all n training examples;
    the models that trained on an example have the larger margin on it."""
    import numpy as np

    from orchestrator import api
    from orchestrator.metrics.memorization import memorization
    from workers import bits
    root, clean = tiny
    summary = pipeline.run(compose(["experiment=tiny", "task.targets=both"], tmp_path))
    assert summary["config_hash"] != clean["config_hash"]
    def scores(s):       # the LDS of every method, without the seconds it took
        return {m: {k: e.get(k) for k in ("mean", "ci95", "median", "targets", "mse")} for m, e in s["lds"].items()}
    assert scores(summary) == scores(clean)
    assert summary["models"] == clean["models"]
    exp = api.open(summary["experiment_dir"])
    led = exp._ledger
    index = led.index()
    for mask_set, count in (("train", 300), ("eval", 60)):
        pos = index.select(mask_set)
        assert len(pos) == count
        packed, own, right = led.read_self(index, pos, 0, exp.n)
        assert own.shape == (count, exp.n) and np.isfinite(own).all()
    pos = index.select("train")
    packed, own, right = led.read_self(index, pos, 0, exp.n)
    mem = memorization(bits.unpack(packed, exp.n), own, n_boot=0)["value"]
    assert np.nanmean(mem) > 0.5, np.nanmean(mem)          # trained on it: a larger margin on it
    X = bits.unpack(packed, exp.n)
    assert right[X].mean() > right[~X].mean()
