"""Does work spread over nodes that share nothing? models/s with 1 and 2 worker nodes.

Starts the share-nothing cluster of the tests (tests/cluster.py: a `ray start` head with 0
CPUs on 127.0.0.1, worker nodes with 1 CPU each in their own mount namespaces), submits
a train stage with `ray job submit` (store on the head's disk, served to the workers, or on
S3), first with one worker node, then with two, and prints the train stage's models/s for
each and their ratio. Needs root (unshare --mount). On a 2-core machine the second node
competes with the head, the driver and Ray's own processes for the same two cores.

    .venv/bin/python bench/cluster_scale.py [--models 400] [--task fmnist_mlp] [--store local|s3]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=400, help="train models")
    ap.add_argument("--task", default="fmnist_mlp", help="task preset: fmnist_mlp (the default's MLP, about "
                    "0.1 s per model on a core) or digits_mlp (so small that Ray's own processes dominate)")
    ap.add_argument("--store", choices=("local", "s3"), default="local")
    args = ap.parse_args()
    from orchestrator.storage.store import Store
    from tests.cluster import Cluster, S3Server
    root = tempfile.mkdtemp(prefix="dmb-", dir="/tmp")
    s3 = S3Server(root) if args.store == "s3" else None
    if s3:
        s3.make_bucket("bench")
    cluster = Cluster(root, env_extra=S3Server.env)
    rates = {}
    try:
        cluster.start_head()
        for nodes in (1, 2):
            while len(cluster.nodes) < nodes:
                cluster.add_worker()
            over = [f"task={args.task}", "exp.name=scale", "stage=train", f"masks.n_train={args.models}",
                    "masks.n_eval=1", "eval.replicas=1", "baselines.methods=[]", "train.models_per_unit=20",
                    f"exp.root={cluster.exp_root}/n{nodes}", "tracking.enabled=false"]
            if s3:
                over.append(f"store.uri='{s3.uri('bench', f'n{nodes}')}'")
            cmd = f"cd {REPO} && {sys.executable} -m orchestrator " + " ".join(shlex.quote(a) for a in over)
            t0 = time.time()
            r = cluster.submit(cmd)
            wall = time.time() - t0
            if r.returncode != 0:
                raise SystemExit(f"job failed:\n{r.stdout[-3000:]}")
            if s3:
                base = Store(s3.uri("bench", f"n{nodes}"))
                store = Store(s3.uri("bench", f"n{nodes}/{base.list_dirs('')[0]}"))
            else:
                d = os.path.join(cluster.exp_root, f"n{nodes}")
                store = Store(os.path.join(d, [x for x in os.listdir(d) if x.startswith("scale-")][0]))
            st = json.loads(store.read_bytes("summary.json"))["train"]
            rates[nodes] = st["models_trained"] / st["seconds"]
            print(f"RESULT worker_nodes={nodes} models={st['models_trained']} train_stage={st['seconds']:.1f} s "
                  f"job={wall:.1f} s  {rates[nodes]:.1f} models/s  hosts={sorted(st['hosts'].values())}", flush=True)
    finally:
        cluster.stop()
        if s3:
            s3.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"RESULT 2 nodes / 1 node = {rates[2] / rates[1]:.2f}x models/s (store: {args.store})")


if __name__ == "__main__":
    main()
