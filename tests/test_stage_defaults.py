"""The opt-in stages (counterfactual, brittleness, leakage, embedding, compare) as a user runs
them: each with its shipped defaults on experiment=tiny, and the closing block naming the
result files of the stage that ran (and of those an earlier run left)."""
from __future__ import annotations

import os
import time

import pytest

from orchestrator import pipeline
from tests.conftest import compose

APPLICATIONS = ("counterfactual", "brittleness", "leakage", "embedding", "compare")


def summary_with(stage: str) -> dict:
    return {"experiment_dir": "/runs/tiny-abc", "stage": stage, "models": {"train": 300, "eval": 60},
            "plots": {"lds": "lds.png", "lds_vs_models": "lds_vs_models.png"},
            "counterfactual": {"table": "counterfactual.json",
                               "files": ["counterfactual.json", "counterfactual_drop.png",
                                         "counterfactual_calibration.png"],
                               "headline": ["margin drop after removing each method's top 50: datamodels 3.58"]},
            "leakage": {"table": "leakage.json", "csv": "leakage_pairs.csv",          # written before "files"
                        "plots": {"leakage_top": "leakage_top.png"}}}


def test_the_closing_block_names_the_applications_files(capsys):
    pipeline.print_table(summary_with("counterfactual"), evaluated=False)
    out = capsys.readouterr().out.splitlines()
    at = out.index("results:  /runs/tiny-abc")
    assert out[at - 2:at] == ["counterfactual:", "  margin drop after removing each method's top 50: datamodels 3.58"]
    assert out[at + 1:] == ["          summary.json, lds.png, lds_vs_models.png",
                            "          counterfactual: counterfactual.json, counterfactual_drop.png, "
                            "counterfactual_calibration.png",
                            "          leakage (from an earlier stage=leakage run): leakage.json, leakage_pairs.csv, "
                            "leakage_top.png"]
    pipeline.print_table(summary_with("leakage"), evaluated=False)       # the stage that ran comes first
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["          leakage: leakage.json, leakage_pairs.csv, leakage_top.png",
                        "          counterfactual (from an earlier stage=counterfactual run): counterfactual.json, "
                        "counterfactual_drop.png, counterfactual_calibration.png"]
    assert "counterfactual:" not in out                                   # no headline of an earlier run


@pytest.mark.slow
def test_each_opt_in_stage_runs_with_its_defaults_on_tiny(tmp_path, ray_local, capsys):
    """experiment=tiny (sklearn digits, n=300, masks of 150, 50 targets) run once, then every
    opt-in stage with nothing but stage=... (compare also needs compare.other: a second, cheaper
    recipe on the same task). Each finishes, writes the files its entry names, and the closing
    block names them."""
    base = ["experiment=tiny"]
    summary = pipeline.run(compose(base, tmp_path))
    other = pipeline.run(compose(base + ["exp.name=tiny_short", "train.epochs=3", "masks.n_train=100",
                                         "baselines.methods=[]", "fit.prefixes=[]"], tmp_path))
    assert other["experiment_dir"] != summary["experiment_dir"]
    seconds = {}
    for stage in APPLICATIONS:
        capsys.readouterr()
        extra = [f"compare.other={other['experiment_dir']}"] if stage == "compare" else []
        t0 = time.perf_counter()
        out = pipeline.run(compose(base + [f"stage={stage}"] + extra, tmp_path))
        seconds[stage] = round(time.perf_counter() - t0, 1)
        printed = capsys.readouterr().out
        entry = out[stage]
        assert entry["files"] and entry["headline"], stage
        root = out["experiment_dir"]
        for rel in entry["files"]:
            assert os.path.getsize(os.path.join(root, rel)) > 0, rel
        block = printed[printed.index("results:  "):]
        line = [x for x in block.splitlines() if x.strip().startswith(f"{stage}:")]
        assert line and all(os.path.basename(rel) in line[0] for rel in entry["files"]), (stage, block)
        assert f"{stage}:\n  {entry['headline'][0]}" in printed
        if stage == "brittleness":
            assert entry["ks"] == [5, 10, 20, 40, 80]                     # the default's 160 > 150 left out
        if stage == "counterfactual":
            assert entry["ks"] == [10, 20, 50] and len(entry["targets"]) == 10
            assert entry["methods"] == ["datamodels", "trak", "tracin", "representer", "if_cg", "random"]
    for stage in APPLICATIONS[:-1]:                  # the last block names the earlier runs' files too
        assert f"{stage} (from an earlier stage={stage} run): {stage}.json" in block
    print("opt-in stages on experiment=tiny with their defaults, seconds:", seconds)
