"""Names and numbers that existing stores depend on, pinned as literals: the config hash of
every preset (it names the experiment's directory), every Layout path, the names of unit
files (their content digest), the key of the ledger's record of checked files, the names of
the datamodels and scores files, and the LDS of fixed arrays. Moving code must not change
any of them (a store written before would no longer be found, or be recomputed)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import compose

PRESETS = {
    (): "6693add97e",
    ("experiment=tiny",): "1bfbbefd37",
    ("experiment=fmnist_10k",): "8081878d98",
    ("task=digits_mlp",): "1fc05aeeec",
    ("task=cifar10_resnet9", "train=resnet9_datamodels"): "6c42288037",
    ("task=cifar10_resnet9", "train=resnet9_fast"): "39173c8b9b",
    ("masks.alpha=0.25",): "b683ea7c16",
    ("train.epochs=6",): "9a219a2cc4",
}


@pytest.mark.parametrize("overrides", sorted(PRESETS))
def test_config_hash_of_every_preset(overrides, tmp_path):
    from orchestrator.settings.identity import config_hash
    assert config_hash(compose(list(overrides), tmp_path)) == PRESETS[overrides]


def test_layout_paths():
    from orchestrator.storage.store import Layout
    got = [Layout.unit("train-000003", "0123456789abcdef"), Layout.unit("eval-000000", "ff", "counterfactual/x/ledger"),
           Layout.quarantine(), Layout.checked("k"), Layout.checkpoint("train", 12, 0),
           Layout.datamodels(4000, "torch", "a969545d"),
           Layout.chunk("datamodels/m4000-torch-a969545d", 0, 1024), Layout.scores("trak", 5, "12345678"),
           Layout.masks("eval"), Layout.plot("lds"), Layout.LEDGER, Layout.CHECKPOINTS, Layout.DATAMODELS,
           Layout.SCORES, Layout.MASKS, Layout.CLAIMS, Layout.SUMMARY, Layout.CONFIG, Layout.LDS_PER_TARGET,
           Layout.EXPERIMENT]
    assert got == ["ledger/train-000003-0123456789abcdef.parquet", "counterfactual/x/ledger/eval-000000-ff.parquet",
                   "ledger/_quarantine", "ledger/_checked/k.json", "checkpoints/train-0000012-r0.pt",
                   "datamodels/m4000-torch-a969545d", "datamodels/m4000-torch-a969545d/chunk-000000-001024.parquet",
                   "scores/trak-k5-12345678.parquet", "masks/eval.npy", "lds.png", "ledger", "checkpoints",
                   "datamodels", "scores", "masks", "claims", "summary.json", "config.yaml", "lds_per_target.npz",
                   "experiment.json"]


def test_unit_names_and_their_content_digest():
    from orchestrator.stages.train import expected_keys, plan_units
    from orchestrator.storage.ledger import unit_table
    from orchestrator.storage.store import content_digest, table_digests
    expected = expected_keys(250, 7, 3)
    pending = {k for keys in expected.values() for k in keys if k[1] % 3}
    units = plan_units(expected, pending, 100)
    assert [(u.name, len(u.ids)) for u in units] == [("eval-000000", 12), ("train-000000", 66), ("train-000001", 67),
                                                      ("train-000002", 33)]
    rng = np.random.default_rng(0)
    k, T = 4, 5
    rows = {"mask_set": ["train"] * k, "model_id": np.arange(k), "replica": np.zeros(k, np.int32),
            "seed": np.arange(k) + 7, "alpha": [0.5] * k, "mask": rng.integers(0, 256, (k, 3), dtype=np.uint8),
            "margins": rng.normal(size=(k, T)).astype(np.float32), "train_acc": np.ones(k), "target_acc": np.ones(k),
            "loss": np.zeros(k), "seconds": np.ones(k), "host": ["h"] * k, "code_version": ["v"] * k,
            "config_hash": ["abc"] * k}
    assert content_digest(table_digests(unit_table("train-000000", rows))) == "096f7f31923d4a64"


def test_record_of_checked_files_is_keyed_as_before(tmp_path, monkeypatch):
    from orchestrator.storage.ledger import Identity, Ledger
    from orchestrator.storage.store import Store
    key = tmp_path / "key" / "ledger.key"
    key.parent.mkdir()
    key.write_text("00" * 32)
    os.chmod(key, 0o600)
    monkeypatch.setenv("DATAMODELS_KEY_FILE", str(key))
    ledger = Ledger(Store(str(tmp_path / "exp")), Identity("abcdef0123", 0.5, 0, 1000, 200))
    assert ledger._checked_rel() == "ledger/_checked/cf84b57010512633-c4101c406a13.json"


def test_datamodels_and_scores_names(tmp_path):
    from omegaconf import OmegaConf

    from orchestrator.settings import names as fit_stage_names
    from orchestrator.storage import datamodels as fit_stage
    from orchestrator.storage import scores as B
    cfg = compose([], tmp_path)
    fit_cfg = OmegaConf.to_container(cfg.fit, resolve=True)
    models = fit_stage.models_key("abcdef0123", np.arange(4000))
    assert [fit_stage.store_dir(4000, fit_cfg), fit_stage.store_dir(4000, fit_cfg, models),
            fit_stage.store_dir(500, fit_cfg, fit_stage.models_key("abcdef0123", np.arange(500)))] == [
        "datamodels/m4000-torch-a969545d", "datamodels/m4000-torch-8d4767e6", "datamodels/m500-torch-7f0f3a88"]
    assert fit_stage_names.prefix_sizes(fit_cfg, 4000) == [500, 1000, 2000]
    assert B.wanted_files(cfg) == {
        "trak": {1: "scores/trak-k1-f681f1c0.parquet", 2: "scores/trak-k2-526d885d.parquet",
                 5: "scores/trak-k5-eddecd53.parquet"},
        "tracin": {1: "scores/tracin-k1-e7a297c4.parquet", 2: "scores/tracin-k2-4ed0d756.parquet",
                   5: "scores/tracin-k5-e35fa3fe.parquet"},
        "representer": {5: "scores/representer-k5-e35fa3fe.parquet"}, "if_cg": {5: "scores/if_cg-k5-12814be9.parquet"}}


def test_score_method_on_fixed_arrays():
    from orchestrator.metrics.lds import score_method
    rng = np.random.default_rng(5)
    X = rng.random((40, 30)) < 0.5
    W = rng.normal(size=(6, 30)).astype(np.float32)
    Y = (X.astype(np.float32) @ W.T + rng.normal(0, 0.5, (40, 6))).astype(np.float32)
    out, per_target = score_method(X, Y, W, np.zeros(6, np.float32), 200, 3)
    assert json.dumps(out, sort_keys=True) == (
        '{"ci95": [0.9409943714821764, 0.9719176047529706], "margin_var": 6.070682525634766, '
        '"mean": 0.9592557848655411, "median": 0.9614446529080676, "mse": 0.2649194661850515, "targets": 6}')
    assert [float(x).hex() for x in per_target] == [
        "0x1.ee0969f447da6p-1", "0x1.ea7b88805611ep-1", "0x1.d93116309b3bap-1", "0x1.f28d355035cb3p-1",
        "0x1.e88fb4b05dc13p-1", "0x1.f6027f6027f60p-1"]
    out2, _ = score_method(X, Y, W, None, 200, 3)
    assert json.dumps(out2, sort_keys=True) == (
        '{"ci95": [0.9409943714821764, 0.9719176047529706], "mean": 0.9592557848655411, '
        '"median": 0.9614446529080676, "targets": 6}')
