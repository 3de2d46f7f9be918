"""Places the command is pointed at: a store URI of every shape, a store or cluster that does
not answer, paths that cannot be created, an experiment with nothing to compare, symbolic
links inside a store. Each is one line naming the setting, exit 2, within a bounded time,
with nothing created; all through the installed `datamodels` command, run from a temporary
directory without the repository on PYTHONPATH."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

BIN = os.path.join(os.path.dirname(sys.executable), "datamodels")
DEADLINE = 60      # seconds: a generous bound, so that a hang fails the test instead of stalling it


def datamodels(args, tmp_path, env=None, timeout=300):
    """(the process, seconds it took) of `datamodels exp.root=<tmp>/runs tracking.uri=... ARGS`
    run in tmp_path."""
    env = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    base = [f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    t0 = time.monotonic()
    proc = subprocess.run([BIN, *base, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - t0


def refused(args, tmp_path, needle, env=None, seconds=DEADLINE):
    """The one error line of a refused command (exit 2, no traceback, in time)."""
    proc, took = datamodels(args, tmp_path, env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("datamodels: error:")]
    assert len(errors) == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert took < seconds, (took, errors[0])
    return errors[0]


def nothing_created(tmp_path, keep=()):
    assert sorted(set(os.listdir(tmp_path)) - set(keep)) == [], os.listdir(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- URI shapes
@pytest.mark.parametrize("args, needle", [
    (["store.uri=s3://"], "store.uri=s3:// has no bucket; write s3://BUCKET/prefix"),
    (["store.uri=s3:///x"], "store.uri=s3:///x has no bucket"),
    (["store.uri=gs://"], "store.uri=gs:// has no bucket; write gs://BUCKET/prefix"),
    (["store.uri=s3:bucket/x"], "store.uri=s3:bucket/x is not an s3 URI"),
    (["store.uri=s3://bucket:9000/x"], "endpoint_override=HOST:PORT"),
    (["store.uri=file://"], "store.uri=file:// is not a file URI of an absolute path"),
    (["store.uri=file://relative/x"], "file:///absolute/path"),
    (["store.uri=foo://x"], "store.uri=foo://x has an unsupported scheme 'foo:'"),
    (["store.uri=https://example.com/x"], "unsupported scheme 'https:'"),
    (["store.uri=runs/s3://bucket"], "is neither a path nor a URI"),
    (["store.uri=C:\\data"], "store.uri=C:\\data is a Windows path"),
    (["store.uri=C:/data/runs"], "store.uri=C:/data/runs is a Windows path"),
    (["exp.dir=gs://"], "exp.dir=gs:// has no bucket"),
    (["exp.root=s3://bucket/x"], "exp.root=s3://bucket/x must be a local directory"),
    (["exp.root=file:///tmp/x"], "exp.root=file:///tmp/x must be a local directory"),
])
def test_a_store_uri_of_a_bad_shape_is_one_line_and_never_a_local_path(args, needle, tmp_path):
    """`store.uri=s3://` once ran the whole experiment into ./s3:/ and exited 0."""
    refused(["experiment=tiny", "stage=masks", *args], tmp_path, needle)
    nothing_created(tmp_path)


def test_every_shape_of_store_location():
    """What uri_problem accepts and refuses (the command's checks above use it)."""
    from orchestrator.uris import is_remote, local_path, uri_problem
    good = ["runs", "/abs/runs", "./runs", "runs:2024", "file:///abs/runs", "file://localhost/abs", "s3://b",
            "s3://b/p/q?endpoint_override=127.0.0.1:9000&scheme=http", "s3://user:pw@b/p", "gs://b/p", "gcs://b/p",
            "S3://b/p"]
    bad = ["", "s3://", "s3:///x", "s3:/x", "s3:x", "gs://", "gs:///p", "file://", "file://rel/x", "file:rel",
           "file:///x?y=1", "foo://x", "foo:/x", "http://h/x", "hdfs://nn/x", "C:\\x", "C:/x", "c:\\", "\\\\srv\\share",
           "runs/s3://b", "1x://y", "s3://b:9000/p", "s3://b c/p", "s3://b/../p", "gs://b/./p"]
    assert [u for u in good if uri_problem(u)] == []
    assert [u for u in bad if not uri_problem(u)] == []
    assert [is_remote(u) for u in ("s3://b/p", "gs://b", "gcs://b", "file:///x", "runs", "runs:2024")] == \
        [True, True, True, False, False, False]
    assert local_path("file:///a%20b/c") == "/a b/c"


# ----------------------------------------------------------------------------- stores and clusters that do not answer
@pytest.mark.slow       # seconds of timeouts and commands: not in the fast lane
def test_a_gcs_store_that_cannot_be_reached_is_one_line_in_seconds(tmp_path):
    """`store.uri=gs://my-bucket/dm` printed nothing for 4 minutes (the Google client retries for
    15 minutes by default): now the client gives up after retry_limit_seconds (5 s) per call,
    and the probe before the run retries for 10 s at most."""
    line = refused(["experiment=tiny", "stage=masks", "store.uri=gs://my-bucket/dm"], tmp_path,
                   "store.uri=gs://my-bucket/dm")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in line and "AWS_" not in line, line
    nothing_created(tmp_path)


@pytest.mark.slow       # seconds of timeouts and commands: not in the fast lane
def test_an_s3_endpoint_that_does_not_answer_is_one_line_in_seconds(tmp_path):
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_EC2_METADATA_DISABLED="true")
    uri = f"s3://bucket/dm?endpoint_override=127.0.0.1:{port}&scheme=http"
    line = refused(["experiment=tiny", "stage=masks", f"store.uri='{uri}'"], tmp_path, "store.uri=s3://bucket/dm",
                   env=env)
    assert f"127.0.0.1:{port}" in line, line
    nothing_created(tmp_path)


def test_an_unreachable_cluster_address_is_one_line_before_anything_is_written(tmp_path):
    """`cluster.address=127.0.0.1:1` repeated 'Failed to connect to GCS' for minutes, after
    creating the MLflow store."""
    line = refused(["experiment=tiny", "stage=train", f"cluster.address=127.0.0.1:{free_port()}"], tmp_path,
                   "cluster.address=127.0.0.1:")
    assert "connection refused" in line and "no Ray cluster answers" in line, line
    nothing_created(tmp_path)        # no MLflow store, no experiment directory, no Hydra log


@pytest.mark.slow       # seconds of timeouts and commands: not in the fast lane
def test_a_cluster_address_where_no_ray_head_listens_is_one_line(tmp_path):
    """A port that accepts connections and says nothing (not a Ray head): ray.init would retry
    forever; the gRPC handshake gives up after 5 s."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(64)], daemon=True).start()
    try:
        line = refused(["experiment=tiny", "stage=train", f"cluster.address=127.0.0.1:{srv.getsockname()[1]}"],
                       tmp_path, "no gRPC server answered within 5 s")
    finally:
        srv.close()
    assert line.startswith("datamodels: error: cluster.address=127.0.0.1:"), line
    nothing_created(tmp_path)


def test_a_cluster_address_without_a_port_is_one_line(tmp_path):
    refused(["experiment=tiny", "stage=train", "cluster.address=headnode"], tmp_path,
            "cluster.address=headnode is not HOST:PORT")
    nothing_created(tmp_path)


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize("setting", ["exp.root", "store.uri"])
def test_a_path_that_cannot_be_created_names_its_setting(setting, tmp_path):
    """`exp.root=/proc/x` printed a bare `[Errno 2]` naming no setting."""
    line = refused(["experiment=tiny", "stage=masks", f"{setting}=/proc/x"], tmp_path, f"{setting}=/proc/x")
    assert "/proc/x cannot be created" in line and f"set {setting} to a directory" in line, line
    assert "[Errno" not in line, line
    nothing_created(tmp_path)
    assert not os.path.exists("/proc/x")


@pytest.mark.slow       # seconds of timeouts and commands: not in the fast lane
def test_a_missing_directory_is_created_only_when_the_run_goes_ahead(tmp_path):
    """A deep directory that does not exist yet is created (it is what the user named), and only
    then: a run refused after the store's probe leaves nothing of it behind."""
    deep = tmp_path / "not" / "yet" / "there"
    refused(["experiment=tiny", "stage=compare", f"exp.root={deep}"], tmp_path, "has no datamodels yet")
    nothing_created(tmp_path)
    proc, _ = datamodels(["experiment=tiny", "stage=masks", "tracking.enabled=false", f"exp.root={deep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (exp,) = [d for d in os.listdir(deep) if d.startswith("tiny-")]
    assert os.path.isfile(deep / exp / "masks" / "train.npy")
    assert sorted(os.listdir(tmp_path)) == ["not"]


def test_compare_in_an_empty_experiment_says_there_are_no_datamodels_yet(tmp_path):
    """`stage=compare` in an empty directory blamed the datamodels of 'm0'."""
    line = refused(["experiment=tiny", "stage=compare", f"compare.other={tmp_path}/elsewhere"], tmp_path,
                   "has no datamodels yet (nor any trained models); run stage=all (or stage=fit) first")
    assert "m0" not in line and line.startswith("datamodels: error: compare: "), line
    nothing_created(tmp_path)


# ----------------------------------------------------------------------------- symbolic links
def test_a_symlinked_directory_inside_the_store_is_refused_and_nothing_outside_is_written(tmp_path):
    exp = tmp_path / "exp"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    exp.mkdir()
    os.symlink(outside, exp / "masks")
    line = refused(["experiment=tiny", "stage=masks", "tracking.enabled=false", f"exp.dir={exp}"], tmp_path,
                   f"{exp}/masks is a symbolic link inside the store")
    assert line.startswith(f"datamodels: error: exp.dir={exp}: "), line
    assert sorted(os.listdir(outside)) == ["keep.txt"] and (outside / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(exp)) == ["masks"]
    nothing_created(tmp_path, keep=["exp", "outside"])


def test_a_store_root_that_is_a_symlink_is_used(tmp_path):
    """The root itself may be a link the user made: the run writes where it points."""
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    proc, _ = datamodels(["experiment=tiny", "stage=masks", "tracking.enabled=false", f"exp.dir={tmp_path}/link"],
                         tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(real / "masks" / "train.npy")


def test_the_store_never_writes_moves_or_deletes_through_a_link(tmp_path):
    """Links that appear while a run goes on (after the probe): every write, move, delete and
    listing through one is a StoreError naming it, and nothing outside changes."""
    from orchestrator.storage.store import Store, StoreError
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.parquet").write_bytes(b"theirs")
    st = Store(str(tmp_path / "exp"))
    st.write_bytes("ledger/a.bin", b"ours")
    os.symlink(outside, tmp_path / "exp" / "scores")
    os.symlink(outside / "victim.parquet", tmp_path / "exp" / "ledger" / "b.bin")
    calls = [lambda: st.write_bytes("scores/x.bin", b"x"), lambda: st.write_bytes("ledger/b.bin", b"x"),
             lambda: st.move("scores/victim.parquet", "ledger/c.bin"), lambda: st.move("ledger/a.bin", "scores/a.bin"),
             lambda: st.delete("scores/victim.parquet"), lambda: st.list("scores"), lambda: st.list_dirs("scores"),
             lambda: st.probe()]
    for call in calls:
        with pytest.raises(StoreError, match="is a symbolic link inside the store") as err:
            call()
        assert "\n" not in str(err.value)
    assert sorted(os.listdir(outside)) == ["victim.parquet"] and (outside / "victim.parquet").read_bytes() == b"theirs"
    assert st.read_bytes("ledger/a.bin") == b"ours"
