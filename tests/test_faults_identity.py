"""Faults of identity: a directory that holds another experiment, counts below what the ledger
holds, drivers with different unit sizes, a summary.json that is not an object, a datamodels
chunk that fails verification at stage=evaluate. Each counts what was trained, fitted and
moved, and what the user saw."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import pytest

from orchestrator import pipeline
from orchestrator.errors import ConfigError
from orchestrator.storage.datamodels import DatamodelsError
from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Layout, Store
from tests.conftest import compose
from tests.test_pipeline import planted_overrides, trained

pytestmark = pytest.mark.slow          # whole pipelines on Ray


def report(name: str, **figures) -> None:
    print(f"FAULT {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_local):
    """One finished planted experiment (400 train models, 40 eval masks × 2 seeds): (its root,
    its summary). Tests work on copies (`copy_of`): the same experiment, since its task's
    counter directory, which the config hash covers, stays the base's."""
    root = tmp_path_factory.mktemp("base")
    return root, pipeline.run(compose(planted_overrides(root), root))


def copy_of(base, tmp_path) -> list:
    """A copy of the base experiment (and its MLflow store) under tmp_path; the overrides that
    name it, to compose with tmp_path."""
    root, _ = base
    shutil.copytree(root / "runs", tmp_path / "runs")
    shutil.copy(root / "mlflow.db", tmp_path / "mlflow.db")
    return lambda extra=(): planted_overrides(root, extra=list(extra))


def tree(root) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_a_directory_of_another_experiment_is_refused_and_left_as_it_was(tmp_path, base):
    """exp.dir=<an α=0.5 experiment> masks.alpha=0.4: refused in one line naming exp.dir and
    what differs, before anything is written; not a file of the first experiment moved or
    changed. The same for a directory written before experiments had a marker (recognised by
    its ledger's rows)."""
    over = copy_of(base, tmp_path)
    first = pipeline.run(compose(over(["stage=evaluate"]), tmp_path))
    where = first["experiment_dir"]
    before = tree(where)
    assert Layout.EXPERIMENT in before
    for legacy in (False, True):
        if legacy:            # a directory of the code before the marker: its ledger says whose it is
            os.unlink(os.path.join(where, Layout.EXPERIMENT))
            os.unlink(os.path.join(where, Layout.SUMMARY))
            before = tree(where)
        cfg = compose(over([f"exp.dir={where}", "masks.alpha=0.4"]), tmp_path)
        with pytest.raises(ConfigError) as err:
            pipeline.run(cfg)
        line = str(err.value)
        assert "\n" not in line and line.startswith("exp.dir:"), line
        assert first["config_hash"] in line
        if not legacy:
            assert "alpha 0.5 → 0.4" in line, line
        assert tree(where) == before, "the first experiment's files changed"
        assert not os.path.exists(os.path.join(where, "ledger", "_quarantine"))
    report("another experiment's directory", legacy_too=True, files_moved=0, models_trained=0)


def test_counts_below_the_ledger_use_exactly_the_asked_models(tmp_path, base):
    """A 400-model experiment asked for masks.n_train=200 masks.n_eval=20 eval.replicas=1:
    nothing is trained, the fit and the LDS use exactly those models (the same LDS, to the
    bit, as an experiment that only ever trained them), and the summary says so."""
    over = copy_of(base, tmp_path)
    count = trained(base[0] / "count")
    fewer = ["masks.n_train=200", "masks.n_eval=20", "eval.replicas=1"]
    s = pipeline.run(compose(over(fewer), tmp_path))
    assert trained(base[0] / "count") == count, "models were trained for lower counts"
    assert s["models"] == {"train": 200, "eval": 20}
    assert s["fit"]["dir"].startswith("datamodels/m200-"), s["fit"]["dir"]
    assert s["eval_masks"] == 20

    clean_root = tmp_path / "clean"
    clean_root.mkdir()
    clean = pipeline.run(compose(planted_overrides(clean_root, extra=fewer), clean_root))
    assert clean["models"] == {"train": 200, "eval": 20}
    assert s["lds"]["datamodels"]["mean"] == clean["lds"]["datamodels"]["mean"]
    assert s["lds"]["datamodels"]["ci95"] == clean["lds"]["datamodels"]["ci95"]
    # the bigger counts again: their own datamodels, nothing retrained, the LDS of 400 models
    again = pipeline.run(compose(over(), tmp_path))
    assert again["models"] == {"train": 400, "eval": 80}
    assert again["fit"]["dir"] == base[1]["fit"]["dir"] and again["fit"]["chunks_fit"] == 0
    assert again["lds"]["datamodels"]["mean"] == base[1]["lds"]["datamodels"]["mean"]
    assert trained(base[0] / "count") == count
    report("counts below the ledger", trained=0, lds_200=s["lds"]["datamodels"]["mean"],
           lds_clean_200=clean["lds"]["datamodels"]["mean"])


def test_a_second_driver_with_another_unit_size_uses_the_experiments(tmp_path, ray_local, caplog):
    """Units are named by their boundaries, and claims by the units' names: a driver whose
    train.models_per_unit differs from the experiment's uses the experiment's (one warning),
    so that drivers name, claim and write the same units."""
    small = ["stage=train", "masks.n_train=100", "masks.n_eval=5", "eval.replicas=1"]
    pipeline.run(compose(planted_overrides(tmp_path, extra=[*small, "train.models_per_unit=20"]), tmp_path))
    more = ["stage=train", "masks.n_train=200", "masks.n_eval=5", "eval.replicas=1", "train.models_per_unit=50"]
    with caplog.at_level(logging.WARNING):
        s = pipeline.run(compose(planted_overrides(tmp_path, extra=more), tmp_path))
    warned = [r.getMessage() for r in caplog.records if "models_per_unit" in r.getMessage()]
    assert len(warned) == 1 and "using 20" in warned[0], warned
    store = Store(s["experiment_dir"])
    index = Ledger(store).index()
    for rel in index.files:
        unit = rel.rsplit("/", 1)[1].rsplit("-", 1)[0]
        mask_set, block = unit.split("-")
        if mask_set == "train":
            ids = index.model_id[(index.file == index.files.index(rel)) & (index.set_code == 0)]
            assert ids.min() // 20 == ids.max() // 20 == int(block), (unit, ids.min(), ids.max())
    assert trained(tmp_path / "count") == 200 + 5


def test_a_summary_that_is_not_an_object_is_kept_aside_and_replaced(tmp_path, base, caplog):
    """summary.json holding `null` (or not JSON) no longer breaks every later stage: one
    warning naming it, the file kept aside, and a new summary written."""
    over = copy_of(base, tmp_path)
    s = pipeline.run(compose(over(["stage=evaluate"]), tmp_path))
    path = os.path.join(s["experiment_dir"], Layout.SUMMARY)
    for bad in (b"null", b"{not json"):
        with open(path, "wb") as f:
            f.write(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = pipeline.run(compose(over(["stage=evaluate"]), tmp_path))
        assert again["lds"]["datamodels"]["mean"] == s["lds"]["datamodels"]["mean"]
        assert any("summary.json is unreadable" in r.getMessage() for r in caplog.records)
        kept = [n for n in os.listdir(s["experiment_dir"]) if n.startswith("summary.json.unreadable-")]
        assert any(open(os.path.join(s["experiment_dir"], n), "rb").read() == bad for n in kept)
        assert isinstance(json.load(open(path)), dict)


def test_a_corrupt_datamodels_chunk_at_evaluate_is_one_line_and_refit_by_fit(tmp_path, base):
    """stage=evaluate on a datamodels chunk overwritten in its middle: DatamodelsError naming
    the file and stage=fit (the CLI prints it as one line); stage=fit then refits that chunk
    alone, and the LDS is the one before."""
    over = copy_of(base, tmp_path)
    s = pipeline.run(compose(over(["stage=evaluate"]), tmp_path))
    chunk = sorted(os.listdir(os.path.join(s["experiment_dir"], s["fit"]["dir"])))[0]
    path = os.path.join(s["experiment_dir"], s["fit"]["dir"], chunk)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3:len(data) // 3 + 8] = b"\xff" * 8
    open(path, "wb").write(bytes(data))
    with pytest.raises(DatamodelsError) as err:
        pipeline.run(compose(over(["stage=evaluate"]), tmp_path))
    assert chunk in str(err.value) and "stage=fit" in str(err.value) and "\n" not in str(err.value)
    fit = pipeline.run(compose(over(["stage=fit"]), tmp_path))
    assert fit["fit"]["chunks_fit"] == 1
    ev = pipeline.run(compose(over(["stage=evaluate"]), tmp_path))
    assert ev["lds"]["datamodels"]["mean"] == s["lds"]["datamodels"]["mean"]


def test_a_chunk_of_other_models_is_never_read_as_this_runs(tmp_path, base):
    """A chunk copied into a datamodels directory from another one (other models: a prefix
    fit's) fails the directory's key: refit by stage=fit, refused by evaluate."""
    over = copy_of(base, tmp_path)
    s = pipeline.run(compose(over(["fit.prefixes=[0.5]"]), tmp_path))
    full = os.path.join(s["experiment_dir"], s["fit"]["dir"])
    prefix = os.path.join(s["experiment_dir"], list(s["fit"]["prefixes"].values())[0])
    name = sorted(os.listdir(full))[0]
    with open(os.path.join(prefix, name), "rb") as src, open(os.path.join(full, name), "wb") as dst:
        dst.write(src.read())
    with pytest.raises(DatamodelsError) as err:
        pipeline.run(compose(over(["stage=evaluate", "fit.prefixes=[0.5]"]), tmp_path))
    assert "another experiment, other models" in str(err.value)
    fit = pipeline.run(compose(over(["stage=fit", "fit.prefixes=[0.5]"]), tmp_path))
    assert fit["fit"]["chunks_fit"] == 1


def test_api_open_on_a_corrupt_config_or_summary_is_one_line(tmp_path, base):
    """api.open on an experiment whose config.yaml is not YAML, or whose summary.json holds
    `null`: ApiError, one line naming the file (a traceback from OmegaConf or a TypeError
    before); nothing is written."""
    from orchestrator import api
    over = copy_of(base, tmp_path)
    s = pipeline.run(compose(over(["stage=evaluate"]), tmp_path))
    where = s["experiment_dir"]
    assert api.open(where).lds()["mean"] == s["lds"]["datamodels"]["mean"]
    before = tree(where)
    for rel, bad in ((Layout.CONFIG, b"masks: [unclosed\n  - :"), (Layout.CONFIG, b"\xff\xfe\x00"),
                     (Layout.CONFIG, b"- a list\n"), (Layout.SUMMARY, b"null"), (Layout.SUMMARY, b"{}")):
        good = open(os.path.join(where, rel), "rb").read()
        open(os.path.join(where, rel), "wb").write(bad)
        with pytest.raises(api.ApiError) as err:
            api.open(where)
        assert rel in str(err.value) and "\n" not in str(err.value), str(err.value)
        open(os.path.join(where, rel), "wb").write(good)
    assert tree(where) == before
