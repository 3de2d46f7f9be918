"""Wall time of the analysis stages on a finished experiment (the embedded default unless
overrides say otherwise), each run as the user runs it: `datamodels stage=<name> ...` in a
fresh process. Prints, per stage, the wall seconds, the models it trained (removal stages)
and the seconds per trained model; a second pass of each stage is the resume (nothing to
train), run in the same job as the baseline of what the retraining costs.

    python bench/stages_wall.py [--stages counterfactual,brittleness] [override ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stage(stage: str, overrides: list[str]) -> tuple[float, dict]:
    exe = os.path.join(os.path.dirname(sys.executable), "datamodels")
    t0 = time.perf_counter()
    out = subprocess.run([exe, f"stage={stage}", *overrides], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"stage={stage} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    where = next(line.split(None, 1)[1] for line in out.stdout.splitlines() if line.startswith("results:"))
    with open(os.path.join(where.strip(), "summary.json")) as f:
        return wall, json.load(f).get(stage, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="counterfactual,brittleness")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    print(f"{'stage':<16}{'pass':<8}{'wall s':>9}{'trained':>9}{'s/model':>9}")
    for stage in args.stages.split(","):
        for label in ("first", "resume"):
            wall, entry = run_stage(stage, args.overrides)
            trained = int((entry.get("models") or {}).get("models_trained", 0)) if isinstance(entry, dict) else 0
            per = f"{wall / trained:.3f}" if trained else "-"
            print(f"{stage:<16}{label:<8}{wall:>9.1f}{trained:>9}{per:>9}", flush=True)


if __name__ == "__main__":
    main()
