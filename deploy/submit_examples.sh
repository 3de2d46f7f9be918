#!/usr/bin/env bash
# Examples of running the datamodels pipeline. Not meant to be run top to bottom: copy the
# block you need. Every argument after `python -m orchestrator` (or `datamodels`, the same
# Hydra app) is a Hydra override; conf/ is the reference for keys and defaults.
#
# Keys used below: task=digits_mlp|fmnist_mlp|cifar10_resnet9, train=cpu|resnet9_datamodels|
# resnet9_fast, fit=glmnet|torch (the group; fit.backend names the solver), masks.alpha,
# masks.n_train, masks.n_eval, eval.replicas, exp.name, store.uri, exp.root, tracking.uri,
# cluster.address, train.workers, train.gpus_per_worker,
# stage=all|masks|train|fit|baselines|evaluate.
#
# store.uri is where experiments live: each is <store.uri>/<exp.name>-<hash> (ledger,
# checkpoints, datamodels, scores, summary.json, plots). A local directory or
# s3://BUCKET/prefix (credentials from the environment or the instance role); an
# S3-compatible server goes in the query, quoted for Hydra and the shell:
#   "store.uri='s3://BUCKET/datamodels?endpoint_override=minio.internal:9000&scheme=http'"
# Unset, experiments go under exp.root, which otherwise holds only Hydra's outputs.
set -euo pipefail
echo "deploy/submit_examples.sh holds examples to copy; it does not run anything." >&2
exit 0

# ----------------------------------------------------------------------------------------
# 1. Local, no cluster: the driver starts a Ray instance in-process. Digits and
#    Fashion-MNIST train on a CPU. Ray 2.60 turns token authentication on by default for
#    such local clusters (it writes ~/.ray/auth_token); RAY_AUTH_MODE=disabled opts out.
# ----------------------------------------------------------------------------------------
python -m orchestrator experiment=tiny                       # every stage, about 2 minutes
python -m orchestrator task=digits_mlp masks.alpha=0.5 masks.n_train=2000 masks.n_eval=100 \
    eval.replicas=3 fit=glmnet
datamodels task=fmnist_mlp train.workers=2 \
    task.data.root=/usr/share/datasets/fashion-mnist        # Debian package dataset-fashion-mnist

# Join a running cluster from this machine instead of submitting a job (Ray Client; a
# cluster with token auth wants RAY_AUTH_MODE=token and its token here too, see 2.):
RAY_AUTH_MODE=token python -m orchestrator task=digits_mlp cluster.address=ray://HEAD:10001 \
    store.uri=s3://my-datamodels-bucket/datamodels

# ----------------------------------------------------------------------------------------
# 2. Remote Ray cluster (deploy/cluster.yaml, or any Ray 2.60 cluster). The driver runs on
#    the head; --working-dir ships this checkout (files in .gitignore are left out).
#    Ray 2.60 token auth: a cluster started with RAY_AUTH_MODE=token wants
#    RAY_AUTH_MODE=token on every `ray job` command too, and the token in RAY_AUTH_TOKEN,
#    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token --generate` before
#    `ray up`). On KubeRay (authOptions.mode=token) the token is in a Secret named after
#    the RayCluster:
#      export RAY_AUTH_TOKEN=$(kubectl get secret RAYCLUSTER -o jsonpath='{.data.auth_token}' | base64 -d)
#    The nodes of deploy/cluster.yaml share no disk: keep store.uri in a bucket (it
#    outlives the cluster). A local store.uri also works, on the head, where the driver runs
#    (the driver's node serves it to the workers), but it goes with the head at `ray down`.
# ----------------------------------------------------------------------------------------
ray dashboard deploy/cluster.yaml &         # forwards http://localhost:8265 to the head
HEAD=localhost
STORE=s3://my-datamodels-bucket/datamodels

RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- \
    python -m orchestrator task=cifar10_resnet9 train=resnet9_datamodels exp.name=cifar10_resnet9 \
        masks.alpha=0.5 masks.n_train=10000 masks.n_eval=200 eval.replicas=5 \
        train.workers=8 train.gpus_per_worker=1 fit=torch fit.gpus_per_task=1 \
        store.uri=$STORE exp.root=/home/ray/runs

# Several small models per GPU: four training actors share each GPU.
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- \
    python -m orchestrator task=fmnist_mlp train.device=cuda train.workers=32 \
        train.gpus_per_worker=0.25 store.uri=$STORE exp.root=/home/ray/runs

# The store on an S3-compatible server (MinIO, Ceph, ...) instead of AWS:
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- \
    python -m orchestrator task=fmnist_mlp exp.root=/home/ray/runs \
        "store.uri='s3://my-datamodels-bucket/datamodels?endpoint_override=minio.internal:9000&scheme=http'"

# Detach (--no-wait), then follow or stop the job by its id:
RAY_AUTH_MODE=token ray job submit --no-wait --address "http://$HEAD:8265" --working-dir . -- \
    python -m orchestrator task=cifar10_resnet9 train=resnet9_datamodels exp.name=cifar10_resnet9 \
        store.uri=$STORE exp.root=/home/ray/runs
RAY_AUTH_MODE=token ray job logs --follow --address "http://$HEAD:8265" raysubmit_XXXXXXXX
RAY_AUTH_MODE=token ray job stop --address "http://$HEAD:8265" raysubmit_XXXXXXXX

# ----------------------------------------------------------------------------------------
# 3. A Hydra sweep: -m runs one pipeline per value, one after the other in the same job.
#    Each point is its own experiment, <store.uri>/<exp.name>-<hash>: the hash covers
#    masks.alpha (and the task, the training recipe, exp.seed), so one store.uri holds all.
# ----------------------------------------------------------------------------------------
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- \
    python -m orchestrator -m task=cifar10_resnet9 train=resnet9_datamodels exp.name=cifar10_resnet9 \
        masks.alpha=0.25,0.5 store.uri=$STORE exp.root=/home/ray/runs

# ----------------------------------------------------------------------------------------
# 4. One stage alone. The experiment in the store is the state the stages share: give the
#    same task, recipe, masks.alpha, exp.name and store.uri each time.
# ----------------------------------------------------------------------------------------
COMMON="task=cifar10_resnet9 train=resnet9_datamodels exp.name=cifar10_resnet9 store.uri=$STORE exp.root=/home/ray/runs"
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- python -m orchestrator $COMMON stage=masks
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- python -m orchestrator $COMMON stage=train
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- python -m orchestrator $COMMON stage=fit fit=glmnet
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- python -m orchestrator $COMMON stage=evaluate
# attribution baselines (TRAK, influence functions):
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- python -m orchestrator $COMMON stage=baselines

# ----------------------------------------------------------------------------------------
# 5. Resuming: submit the same command again. Every finished work unit is in the
#    experiment's ledger in the store; only the missing ones are trained. A larger
#    masks.n_train grows the run.
# ----------------------------------------------------------------------------------------
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- python -m orchestrator $COMMON
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- \
    python -m orchestrator $COMMON masks.n_train=25000

# ----------------------------------------------------------------------------------------
# 6. MLflow: tracking.uri=..., else MLFLOW_TRACKING_URI in the driver's environment, else
#    sqlite:///mlflow.db in the driver's working directory (lost with the head node).
# ----------------------------------------------------------------------------------------
RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . -- \
    python -m orchestrator $COMMON tracking.uri=http://mlflow.internal:5000

RAY_AUTH_MODE=token ray job submit --address "http://$HEAD:8265" --working-dir . \
    --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}}' -- \
    python -m orchestrator $COMMON

# ----------------------------------------------------------------------------------------
# 7. Kubernetes (KubeRay): edit the entrypoint overrides in deploy/rayjob.yaml, then
# ----------------------------------------------------------------------------------------
kubectl apply -f deploy/rayjob.yaml
kubectl get rayjob datamodels-cifar10 -w
