"""stage=counterfactual and stage=brittleness on a planted task, where the truth is known:
margin_t(S) = w_t · 1_S + b_t + noise(seed), so removing R from S lowers the margin by exactly
Σ_{i ∈ R ∩ S} w_t,i (the noise is the seed's, the same with and without the removal)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator import pipeline
from orchestrator.analyses.removal import Removals
from orchestrator.errors import ConfigError
from orchestrator.storage import masks as M
from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Store
from tests.conftest import compose
from tests.test_pipeline import PlantedTask, planted_overrides, trained

CF = ["stage=counterfactual", "counterfactual.n_targets=4", "counterfactual.ks=[2,5]", "counterfactual.masks=6"]


def test_removal_masks_regenerate_and_pair_seeds():
    rem = Removals("counterfactual", 3)
    assert rem.add([5, 1, 5]) == 1 and rem.add([1, 5]) == 1 and rem.add([]) == 0
    sets = rem.sets()
    masks = sets.masks(7, "counterfactual", [0, 1, 2, 3, 4, 5], 20, 0.5)
    assert np.array_equal(masks[:3], M.make_masks(7, "counterfactual", [0, 1, 2], 20, 0.5))
    assert not masks[3:, [1, 5]].any() and np.array_equal(masks[3:] | masks[:3], masks[:3])
    assert np.array_equal(sets.seeds(7, "counterfactual", [0, 3], [0, 0])[:1],
                          sets.seeds(7, "counterfactual", [3], [0]))
    with pytest.raises(ValueError, match="not removal masks"):
        sets.masks(7, "counterfactual", [6], 20, 0.5)


def test_toggled_masks_keep_their_size_and_differ_in_the_set_and_as_many_others():
    rem = Removals("memorization", 40, toggle=True)
    assert rem.add([3]) == 1 and rem.add([7, 8, 9]) == 2
    assert rem.digest() != Removals("memorization", 40).digest()      # its own ledger directory
    sets = rem.sets()
    assert sets.describe()["toggle"] is True and "toggle" not in Removals("m", 40).sets().describe()
    masks = sets.masks(7, "memorization", np.arange(120), 30, 0.5)
    base, one, three = masks[:40], masks[40:80], masks[80:]
    assert (masks.sum(1) == 15).all()                              # every mask keeps its size
    assert (one[:, 3] != base[:, 3]).all() and (three[:, 7:10] != base[:, 7:10]).all()
    assert ((one != base).sum(1) == 2).all()                       # the example and one other
    changed = (three != base).sum(1)
    held = base[:, 7:10].sum(1)
    assert np.array_equal(changed, 3 + np.abs(3 - 2 * held))       # the set, and as many others as it nets
    assert np.array_equal(masks, sets.masks(7, "memorization", np.arange(120), 30, 0.5))   # regenerable
    assert np.array_equal(sets.seeds(7, "memorization", [0, 40], [0, 0])[:1], sets.seeds(7, "memorization", [40], [0]))
    full = Removals("memorization", 2, toggle=True)
    full.add(np.arange(13))                                        # every example: nothing to rebalance with
    with pytest.raises(ValueError, match="cannot keep the mask's size"):
        full.sets().masks(7, "memorization", [2], 13, 0.5)


@pytest.mark.slow
def test_counterfactual_and_brittleness_on_a_planted_task(tmp_path, ray_local):
    summary = pipeline.run(compose(planted_overrides(tmp_path), tmp_path))
    before = trained(tmp_path / "count")
    cf = pipeline.run(compose(planted_overrides(tmp_path, extra=CF), tmp_path))["counterfactual"]
    R = cf["models"]["models_expected"]
    assert cf["models"]["models_trained"] == R and trained(tmp_path / "count") == before + R
    assert cf["methods"] == ["datamodels", "random"]
    for k in ("2", "5"):
        d = cf["drop"]["datamodels"][k]
        assert d["actual"] > 0 and abs(d["predicted"] - d["actual"]) < 0.15 * d["actual"]
        assert cf["datamodels_minus_random"][k]["ci95"][0] > 0
    assert 0.85 < cf["fit"]["datamodels"]["slope"] < 1.15 and cf["fit"]["datamodels"]["correlation"] > 0.95
    assert 0.85 < cf["fit"]["datamodels"]["held_out_slope"] < 1.15
    from orchestrator import api
    exp = api.open(summary["experiment_dir"])
    assert exp.calibration_scale() == pytest.approx(cf["fit"]["datamodels"]["scale"])
    with pytest.raises(api.ApiError, match="no calibration for it"):
        exp.calibration_scale("trak")
    store = Store(summary["experiment_dir"])
    table = json.loads(store.read_bytes("counterfactual.json"))
    assert json.loads(store.read_bytes(f"{cf['models']['dir']}/counterfactual.json")) == table   # kept per settings
    assert len(table["cells"]) == 2 * 4 * 2 and store.exists("counterfactual_drop.png")

    # the truth: the planted task's exact drop for each cell
    task = PlantedTask(60, 8)
    rem_masks = M.make_masks(0, "counterfactual", np.arange(6), 60, 0.5)
    for c in table["cells"]:
        if c["method"] == "datamodels":
            order = np.argsort(-pipeline_weights(store, summary)[c["target"]], kind="stable")[:c["k"]]
            exact = (rem_masks[:, order] @ task.W[c["target"], order]).mean()
            assert c["actual"] == pytest.approx(exact, abs=1e-4)

    # resumable: asked again, nothing is retrained
    again = pipeline.run(compose(planted_overrides(tmp_path, extra=CF), tmp_path))["counterfactual"]
    assert again["models"]["models_trained"] == 0 and trained(tmp_path / "count") == before + R
    assert again["drop"] == cf["drop"]

    # a unit file of the removal ledger that is tampered with is quarantined and retrained
    root = f"{cf['models']['dir']}/ledger"
    unit = store.list(root, ".parquet")[0]
    store.write_bytes(unit.rel, store.read_bytes(unit.rel)[:-100])
    third = pipeline.run(compose(planted_overrides(tmp_path, extra=CF), tmp_path))["counterfactual"]
    assert 0 < third["models"]["models_trained"] <= 60 and third["drop"] == cf["drop"]
    assert store.list(f"{root}/_quarantine", ".parquet")

    br = pipeline.run(compose(planted_overrides(tmp_path, extra=[
        "stage=brittleness", "brittleness.n_targets=8", "brittleness.ks=[1,2,4,8]", "brittleness.masks=4"]),
        tmp_path))["brittleness"]
    assert br["targets"] >= 1 and br["candidates"] >= br["targets"]
    curve = br["fraction_flipped"]
    print(curve, br["verified_of_predicted"])
    assert all(0 <= v["verified"] <= v["predicted"] <= 1 for v in curve.values())
    assert curve["8"]["predicted"] > 0 and br["verified_of_predicted"] >= 0.75   # a linear task: the estimate holds
    assert json.loads(store.read_bytes("brittleness.json"))["per_target"]
    assert Ledger(store).index().count("train") == 400        # the experiment's ledger is untouched


def pipeline_weights(store, summary):
    from orchestrator.storage.datamodels import load_datamodels
    return load_datamodels(store, summary["fit"]["dir"], 8)[0]


@pytest.mark.parametrize("override, match", [
    ("counterfactual.targets=[8]", r"counterfactual.targets: 8 is not a target id; this task has targets 0..7"),
    ("counterfactual.ks=[31]", r"counterfactual.ks: 31 must be a count .* mask size 30"),
    ("counterfactual.methods=[trak]", r"counterfactual.methods: 'trak' is not one of"),
    ("counterfactual.masks=1", r"counterfactual.masks"),
])
def test_bad_counterfactual_settings_are_one_line(tmp_path, override, match):
    from orchestrator.runtime.plan import validate
    with pytest.raises(ConfigError, match=match) as err:
        validate(compose(planted_overrides(tmp_path, extra=["stage=counterfactual", "counterfactual.ks=[2,5]",
                                                              override]), tmp_path))
    assert "\n" not in str(err.value)


def test_counterfactual_without_datamodels_is_one_line(tmp_path, capsys):
    from orchestrator.analyses.common import AnalysisError
    with pytest.raises(AnalysisError, match=r"has no datamodels .* run stage=all \(or stage=fit\) first"):
        pipeline.run(compose(planted_overrides(tmp_path, extra=["stage=counterfactual", "counterfactual.ks=[2]"]),
                             tmp_path))


def test_calibration_by_retraining_is_cross_validated_over_targets():
    from orchestrator.metrics.removal import held_out_slope
    rng = np.random.default_rng(0)
    target = np.repeat(np.arange(10), 3)
    p = rng.uniform(1, 5, size=30)
    a = 1.5 * p * (1 + 0.05 * rng.normal(size=30))
    out = held_out_slope(p, a, target)
    assert out["scale"] == pytest.approx(1.5, abs=0.05) and out["held_out_slope"] == pytest.approx(1.0, abs=0.05)
    # one target whose drops are far off: its own cells never calibrate it (computed by hand)
    a2 = a.copy()
    a2[target == 0] *= 3
    q = np.concatenate([p[target == t] * (p[target != t] @ a2[target != t]) / (p[target != t] @ p[target != t])
                        for t in range(10)])
    assert held_out_slope(p, a2, target)["held_out_slope"] == pytest.approx(q @ a2 / (q @ q))
    assert abs(q @ a2 / (q @ q) - 1) > 1e-3                   # in-sample scaling would give exactly 1
    assert held_out_slope(p[:3], a[:3], target[:3]) == {"scale": pytest.approx(p[:3] @ a[:3] / (p[:3] @ p[:3])),
                                                         "held_out_slope": None}
    assert held_out_slope(np.zeros(4), np.ones(4), np.arange(4)) == {"scale": None, "held_out_slope": None}


def test_default_ks_are_cut_to_the_mask_size_and_a_users_are_refused(tmp_path, caplog):
    """experiment=tiny: n=300 at α=0.5, masks of 150. The shipped brittleness grid's 160 is
    left out (one info line at the stage); the same k set by the user is refused before any work."""
    import logging
    from types import SimpleNamespace

    from orchestrator.analyses import counterfactual as CF
    from orchestrator.runtime.plan import validate
    from orchestrator.settings import analyses as analysis_settings
    for stage in ("brittleness", "counterfactual"):
        cfg = compose(["experiment=tiny", f"stage={stage}"], tmp_path)
        plan = validate(cfg)                                         # the defaults pass
        ks, dropped = analysis_settings.stage_ks(cfg, stage, 150)
        assert (ks, dropped) == (([5, 10, 20, 40, 80], [160]) if stage == "brittleness" else ([10, 20, 50], []))
        with caplog.at_level(logging.INFO, logger="orchestrator.analyses.counterfactual"):
            assert CF.resolved_ks(SimpleNamespace(plan=plan), stage) == ks
        left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
        assert left_out == ([] if stage == "counterfactual" else [
            "brittleness: the default brittleness.ks [160] is above the mask size 150 (round(masks.alpha * n)) "
            "and left out; using ks=[5, 10, 20, 40, 80]"])
        caplog.clear()
    # a smaller training set: every default above the mask size is left out, the mask size if none is left
    cfg = compose(["experiment=tiny", "stage=counterfactual", "task.n_train=30"], tmp_path)
    validate(cfg)
    assert analysis_settings.stage_ks(cfg, "counterfactual", 15) == ([10], [20, 50])
    assert analysis_settings.stage_ks(cfg, "counterfactual", 4) == ([4], [10, 20, 50])
    # the user's own k above the mask size: refused in one line, before any work
    for override, match in [("brittleness.ks=[5,160]", r"brittleness.ks: 160 must be .* mask size 150"),
                            ("counterfactual.ks=[10,151]", r"counterfactual.ks: 151 must be .* mask size 150"),
                            ("brittleness.ks=[]", r"brittleness.ks is empty")]:
        stage = override.split(".")[0]
        with pytest.raises(ConfigError, match=match) as err:
            validate(compose(["experiment=tiny", f"stage={stage}", override], tmp_path))
        assert "\n" not in str(err.value)
