"""stage=mislabel: training with restored labels, the repair check's mask sets, and the stage
on a real small task with planted label noise (the ranking per method, the repair by
retraining, resumption, one-line refusals)."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.storage import masks as M

KW = dict(name="digits_mlp", data={"name": "digits"}, n_train=120, n_targets=30,
          model={"name": "mlp", "hidden": [16]}, label_noise=0.1, targets="both")
TRAIN = {"epochs": 3, "batch_size": 20, "lr": 0.05, "lr_peak_epoch": 1, "device": "cpu", "models_per_step": 3}


@pytest.fixture(scope="module")
def noisy_task():
    from workers.tasks import ImageClassificationTask
    task = ImageClassificationTask(**KW)
    task.setup(TRAIN)
    return task


def test_training_with_restored_labels_trains_on_them_and_leaves_the_task_as_it_was(noisy_task):
    task = noisy_task
    masks = np.ones((3, 120), bool)
    seeds = np.arange(3) + 5
    given = task.arrays()[1].copy()
    y_true, flipped = task.true_labels()
    noisy = task.train(masks, seeds)
    same = task.train(masks, seeds, labels=given)
    np.testing.assert_array_equal(same.margins, noisy.margins)            # its own labels: the same models
    clean = task.train(masks, seeds, labels=y_true)
    assert not np.array_equal(clean.margins, noisy.margins)
    # the self margins are scored against the labels trained with: the flipped ones' go up with the true labels
    assert clean.self_margins[:, flipped].mean() > noisy.self_margins[:, flipped].mean()
    np.testing.assert_array_equal(task._trainer.y_train.numpy(), given)   # restored after the call
    np.testing.assert_array_equal(task.train(masks, seeds).margins, noisy.margins)
    with pytest.raises(ValueError, match="labels must be 120 ints"):
        task.train(masks, seeds, labels=given[:10])
    with pytest.raises(ValueError, match="labels must be 120 ints"):
        task.train(masks, seeds, labels=np.full(120, 99))
    np.testing.assert_array_equal(task._trainer.y_train.numpy(), given)


def test_repair_sets_remove_restore_and_pair_the_seeds(noisy_task):
    y_true, flipped = noisy_task.true_labels()
    given = noisy_task.arrays()[1]
    bad = np.flatnonzero(flipped)
    none = np.zeros(0, np.int64)
    sets = M.RepairSets({"repair-noisy": (none, none), "repair-oracle": (bad, none),
                         "repair-clean": (none, bad)}, base=4)
    full = sets.masks(7, "repair-noisy", np.arange(4), 120, 0.5)
    assert full.all() and full.shape == (4, 120)                     # the whole training set, not α-masks
    oracle = sets.masks(7, "repair-oracle", [0, 3], 120, 0.5)
    assert not oracle[:, bad].any() and oracle.sum(1).tolist() == [120 - len(bad)] * 2
    assert sets.labels("repair-noisy", noisy_task) is None and sets.labels("repair-oracle", noisy_task) is None
    restored = sets.labels("repair-clean", noisy_task)
    np.testing.assert_array_equal(restored, y_true)
    assert not np.array_equal(restored, given)
    s = [sets.seeds(7, v, np.arange(4), np.zeros(4)) for v in sets.names]
    assert all(np.array_equal(s[0], x) for x in s) and len(set(s[0].tolist())) == 4   # paired across variants
    with pytest.raises(ValueError, match="not repair models"):
        sets.masks(7, "repair-noisy", [4], 120, 0.5)
    other = M.RepairSets({"repair-noisy": (none, none), "repair-oracle": (bad[:-1], none)}, base=4)
    assert other.describe() != sets.describe()


def test_a_score_file_is_read_only_by_its_own_experiment(tmp_path):
    """stage=mislabel's cached scores carry the experiment's config hash: the same file under
    another experiment's name reads as missing (recomputed), never as its numbers; a damaged
    one too."""
    from orchestrator.analyses.mislabel import _read_vector, _write_vector
    from orchestrator.storage.store import Store
    store = Store(str(tmp_path))
    values = np.linspace(-1, 1, 7)
    _write_vector(store, "mislabel/self/x.parquet", values, {"method": "loss"}, "aaaa")
    np.testing.assert_allclose(_read_vector(store, "mislabel/self/x.parquet", 7, None, "aaaa"), values, atol=1e-7)
    assert _read_vector(store, "mislabel/self/x.parquet", 7, None, "bbbb") is None
    assert _read_vector(store, "mislabel/self/x.parquet", 8, None, "aaaa") is None     # another shape: deleted
    assert _read_vector(store, "mislabel/self/x.parquet", 7, None, "aaaa") is None


@pytest.mark.slow
def test_mislabel_stage_on_tiny_ranks_the_flipped_labels_and_repairs_by_retraining(tmp_path, ray_local, capsys):
    """experiment=tiny with 10% of its labels flipped and TRAK beside the ledger's methods:
    every method ranks the flipped labels far above chance, the files and headline are there,
    the repair check retrains 12 variants x 10 models, the true labels beat the noisy ones, a
    second run trains nothing and gives the same numbers; bad asks are one line each."""
    import csv
    import json
    import os

    from orchestrator import pipeline
    from orchestrator.errors import UserError
    from tests.conftest import compose
    base = ["experiment=tiny", "task.targets=both", "task.label_noise=0.1", "baselines.methods=[trak]",
            "fit.prefixes=[]"]
    pipeline.run(compose(base, tmp_path))
    capsys.readouterr()
    ask = base + ["stage=mislabel", "mislabel.models=10"]
    out = pipeline.run(compose(ask, tmp_path))
    printed = capsys.readouterr().out
    entry, root = out["mislabel"], out["experiment_dir"]
    for rel in entry["files"]:
        assert os.path.getsize(os.path.join(root, rel)) > 0, rel
    assert f"mislabel:\n  {entry['headline'][0]}" in printed and "recovers" in entry["headline"][1]
    assert entry["flipped"] == 30 and list(entry["methods"])[0] == entry["best"]
    assert set(entry["methods"]) == {"memorization", "self_weight", "loss", "trak"}
    for m, d in entry["methods"].items():
        assert d["auc"] > 0.8 and d["auc_ci95"][0] <= d["auc"] <= d["auc_ci95"][1], (m, d)
    assert entry["methods"][entry["best"]]["found"]["0.2"] >= 0.8
    rep = entry["repair"]
    assert rep["k"] == 30 and len(rep["variants"]) == 12
    assert rep["models"]["models_trained"] == 10 * sum("same_as" not in r for r in rep["variants"].values())
    v = rep["variants"]
    assert v["clean"]["test_acc"] > v["noisy"]["test_acc"] and v["oracle"]["flipped_among"] == 30
    assert v["noisy"]["recovered"] == 0 and v["clean"]["recovered"] == 1
    with open(os.path.join(root, entry["csv"])) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300 and sum(r["flipped"] == "True" for r in rows) == 30
    assert sorted(int(r["trak_rank"]) for r in rows) == list(range(1, 301))
    again = pipeline.run(compose(ask, tmp_path))["mislabel"]
    assert again["repair"]["models"]["models_trained"] == 0
    assert json.dumps(again["methods"]) == json.dumps(entry["methods"]) and again["repair"]["variants"] == v
    # a corrupted score file is recomputed, a lost repair unit retrained, nothing else
    import glob
    scored = sorted(glob.glob(os.path.join(root, "mislabel", "self", "trak-*.parquet")))
    units = sorted(glob.glob(os.path.join(root, rep["models"]["dir"], "ledger", "*.parquet")))
    assert len(scored) == 1 and units
    with open(scored[0], "r+b") as f:
        f.seek(40)
        f.write(b"\x00" * 64)
    os.remove(units[0])
    fixed = pipeline.run(compose(ask, tmp_path))["mislabel"]
    assert fixed["repair"]["models"]["models_trained"] == 10
    assert json.dumps(fixed["methods"]) == json.dumps(entry["methods"]) and fixed["repair"]["variants"] == v
    # refused in one line before any work: no label noise, no self margins, an unknown method
    for overrides, words in ((["experiment=tiny", "task.targets=both"], "task.label_noise"),
                             (["experiment=tiny", "task.label_noise=0.1"], "task.targets=both"),
                             (base + ["mislabel.methods=[nope]"], "mislabel.methods")):
        with pytest.raises(UserError) as err:
            pipeline.run(compose(overrides + ["stage=mislabel"], tmp_path / "refused"))
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
