"""Shared fixtures: a local Ray instance for the session, and configs composed the way the
CLI composes them, pointed at a temporary experiment root and MLflow store."""
from __future__ import annotations

import os
import signal
import sys

import pytest

# The suite sends Ctrl-C (SIGINT) to the commands it tests. A shell that starts the suite in the
# background without job control (`bash .ci/run &` in a script) runs it with SIGINT ignored, and
# an ignored signal stays ignored across exec: the commands under test would never see the
# Ctrl-C. A handled signal is reset to the default on exec, so handling it here gives them what a
# terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The key that signs the ledger's records of checked files (orchestrator.storage.ledger.key_path) lives
# in this test session's own directory, never in the home directory of the machine.
if "DATAMODELS_KEY_FILE" not in os.environ:
    import tempfile
    os.environ["DATAMODELS_KEY_FILE"] = os.path.join(tempfile.mkdtemp(prefix="datamodels-test-key-"), "ledger.key")


def compose(overrides: list[str], tmp_path) -> DictConfig:  # noqa: F821
    """The config the command line would run (orchestrator.cli.compose: the schema's types and
    keys checked, a refusal raised as one-line ConfigError), under a temporary root and store."""
    from hydra._internal.utils import get_args_parser
    from omegaconf import open_dict

    from orchestrator import cli
    base = [f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    cfg = cli.compose(get_args_parser().parse_args(base + list(overrides)))
    with open_dict(cfg):            # as a job sees it: Hydra's own node is not part of the config
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, 127.0.0.1) shared by the tests that need one."""
    import ray
    from omegaconf import OmegaConf

    from orchestrator.scheduling import cluster as raycluster
    os.chdir(REPO)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    raycluster.connect(OmegaConf.create({"address": None, "num_cpus": 2, "num_gpus": None}))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1 for the session;
    the test process gets its credentials in the environment, as a cluster node would."""
    from tests.cluster import S3Server
    server = S3Server(str(tmp_path_factory.mktemp("s3")))
    for k, v in server.env.items():
        os.environ[k] = v
    yield server
    server.stop()
