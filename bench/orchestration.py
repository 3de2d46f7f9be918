"""The orchestration ceiling: models/s of driver + Ray + store when training costs nothing.

A task whose train() returns at once (finite margins, no work) runs through the real train
stage (work pool, claims, ledger writes with digests, verification on the next index) for
1k, 10k and 100k models, with the store on the local disk and on an S3 server (moto) on
127.0.0.1. The ceiling divided by a GPU's rate (~0.2 models/s for a CIFAR-10 ResNet-9) is
the largest cluster this driver can keep busy.

    .venv/bin/python bench/orchestration.py [--sizes 1000,10000,100000] [--stores local,s3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class InstantTask:
    """train() returns zeros at once: what is left is the orchestration."""

    def __init__(self, n: int = 64, n_targets: int = 16):
        self.n, self.n_targets = int(n), int(n_targets)

    def check(self):
        pass

    def setup(self, train_cfg):
        pass

    def train(self, masks, seeds, return_weights=False):
        k = len(masks)
        z = np.zeros(k, np.float32)
        return SimpleNamespace(margins=np.zeros((k, self.n_targets), np.float32), train_acc=z, target_acc=z,
                               loss=z, state_dicts=None)


def overrides(models: int, root: str, store: str | None, per_unit: int) -> list[str]:
    out = ["task._target_=bench.orchestration.InstantTask", "+task.n=64", "task.n_targets=16",
           "~task.data", "~task.n_train", "~task.target_split", "~task.subset_seed", "~task.model", "~task.margin",
           "~task.name", f"masks.n_train={models}", "masks.n_eval=1", "eval.replicas=1", "stage=train",
           f"train.models_per_unit={per_unit}", "baselines.methods=[]", "exp.name=ceiling",
           f"exp.root={root}", "tracking.enabled=false", "cluster.num_cpus=2"]
    if store:
        out.append(f"store.uri={store}")
    return out


def compose(over: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import orchestrator.settings.schema  # noqa: F401  (registers the structured configs)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = hcompose("config", overrides=over)
    GlobalHydra.instance().clear()
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--stores", default="local,s3")
    ap.add_argument("--per-unit", type=int, default=100, help="train.models_per_unit")
    ap.add_argument("--gpu-rate", type=float, default=0.2, help="models/s of one GPU (CIFAR-10 ResNet-9)")
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)
    from orchestrator import pipeline
    from tests.cluster import S3Server
    os.chdir(REPO)
    tmp = tempfile.mkdtemp(prefix="ceiling-")
    s3 = None
    rows = []
    try:
        for kind in args.stores.split(","):
            if kind == "s3" and s3 is None:
                s3 = S3Server(tmp, relay=False)     # moto itself, no test relay in between
                s3.make_bucket("ceiling")
            for models in (int(x) for x in args.sizes.split(",")):
                root = os.path.join(tmp, f"{kind}-{models}")
                uri = s3.uri("ceiling", f"r{models}") if kind == "s3" else None
                cfg = compose(overrides(models, root, f"'{uri}'" if uri else None, args.per_unit))
                t0 = time.perf_counter()
                s = pipeline.run(cfg)
                wall = time.perf_counter() - t0
                st = s["train"]
                rate = st["models_trained"] / st["seconds"]
                rows.append((kind, models, st["units"], st["seconds"], wall, rate))
                print(f"RESULT store={kind:<5} models={models:>7} units={st['units']:>5} "
                      f"train_stage={st['seconds']:8.1f} s "
                      f"run={wall:8.1f} s  {rate:9.0f} models/s  -> feeds {rate / args.gpu_rate:9.0f} GPUs at "
                      f"{args.gpu_rate} models/s each", flush=True)
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nstore   models   units  train stage s   models/s   GPUs it can feed")
    for kind, models, units, secs, _wall, rate in rows:
        print(f"{kind:<6}{models:>8}{units:>8}{secs:>15.1f}{rate:>11.0f}{rate / args.gpu_rate:>19.0f}")


if __name__ == "__main__":
    main()
