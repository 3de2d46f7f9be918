"""The store: URIs, atomic writes, verified reads, retries on S3, and secrets kept out of
everything the user or MLflow sees."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

import pyarrow as pa
import pytest

from orchestrator.storage.store import CorruptFile, Store, StoreError
from orchestrator.uris import join, redact


def test_redact_and_join_keep_the_query_and_hide_secrets():
    uri = "s3://b/p?endpoint_override=h:9000&access_key=AK&secret_key=SK&scheme=http"
    r = redact(uri)
    assert "AK" not in r and "SK" not in r and "endpoint_override=h:9000" in r
    assert redact("s3://user:pw@b/p") == "s3://***@b/p"
    assert join(uri, "exp-1") == "s3://b/p/exp-1?endpoint_override=h:9000&access_key=AK&secret_key=SK&scheme=http"
    assert join("/tmp/x", "a", "b") == "/tmp/x/a/b"


def test_local_write_is_atomic_and_verified(tmp_path):
    st = Store(str(tmp_path / "exp"))
    st.write_table("d/t.parquet", pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}))
    assert st.read_table("d/t.parquet", ["a"])["a"].to_pylist() == [1, 2, 3]
    assert [e.name for e in st.list("d")] == ["t.parquet"]
    # a failed write leaves nothing behind
    with pytest.raises(TypeError):
        st.write_bytes("d/u.bin", object())          # not bytes: fails inside the write
    assert [e.name for e in st.list("d")] == ["t.parquet"] and not any(
        f.startswith(".tmp-") for f in os.listdir(tmp_path / "exp" / "d"))
    # flipped bytes are a CorruptFile, never data
    path = tmp_path / "exp" / "d" / "t.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFile):
        st.read_table("d/t.parquet")
    with pytest.raises(FileNotFoundError):
        st.read_bytes("d/missing")


def test_unknown_s3_option_and_unwritable_local_store_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="unknown S3 option"):
        Store("s3://b/p?endpont_override=x")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store(str(f / "exp")).probe()


@pytest.mark.slow
def test_s3_writes_ride_out_an_endpoint_outage(s3_server):
    """The endpoint refuses connections for 3 s while a write is retried: it lands once."""
    s3_server.make_bucket("outage")
    st = Store(s3_server.uri("outage", "p"), retry_seconds=30)
    st.write_bytes("a", b"first")
    s3_server.proxy.down()
    timer = threading.Timer(3.0, s3_server.proxy.up)
    timer.start()
    t0 = time.time()
    try:
        st.write_bytes("b", b"second")
    finally:
        timer.join()
    assert time.time() - t0 >= 2.5
    assert st.read_bytes("b") == b"second" and [e.name for e in st.list("")] == ["a", "b"]
    # an outage longer than store.retry_seconds is one StoreError naming the URI, no secrets
    impatient = Store(s3_server.uri("outage", "p", access_key="testing", secret_key="SECRET9"), retry_seconds=1)
    s3_server.proxy.down()
    try:
        with pytest.raises(StoreError) as err:
            impatient.write_bytes("c", b"x")
    finally:
        s3_server.proxy.up()
    assert "s3://outage/p/c" in str(err.value) and "SECRET9" not in str(err.value)
    assert "\n" not in str(err.value)


def test_an_endpoint_whose_port_holds_403_is_retried_not_called_forbidden(caplog):
    """A refused connection to an endpoint on a port like 49403 is a network fault, retried
    until store.retry_seconds; only an HTTP 403 (or the store's own words) is permanent. (CI
    once failed an outage test on port 49403: the port's digits read as 'Forbidden'.)"""
    port = next(p for p in range(40300, 65000) if "403" in str(p) and _free(p))
    st = Store(f"s3://b/p?endpoint_override=127.0.0.1:{port}&scheme=http&access_key=k&secret_key=s",
               retry_seconds=1.5)
    with caplog.at_level(logging.WARNING, logger="orchestrator.storage.store"), pytest.raises(StoreError) as err:
        st.write_bytes("x", b"1")
    assert "retrying for up to" in caplog.text, str(err.value)        # retried, not refused at once
    assert "check the endpoint" in str(err.value) and str(port) in str(err.value)
    from orchestrator.storage.store import _transient
    assert not _transient(OSError("AWS Error UNKNOWN (HTTP status 403) during PutObject"), True)
    assert _transient(OSError("Failed to connect to 127.0.0.1 port 8403 after 0 ms"), True)


def _free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_connection_cut_mid_read_is_retried_not_called_corrupt(s3_server):
    s3_server.make_bucket("cuts")
    st = Store(s3_server.uri("cuts", "p"), retry_seconds=20)
    table = pa.table({"a": list(range(20000)), "b": [f"row {i}" for i in range(20000)]})
    st.write_table("t.parquet", table)
    for after in (300, 5000, 40000):
        s3_server.proxy.cut_next(after, connections=2)
        got = st.read_table("t.parquet")
        assert got.equals(table)
        s3_server.proxy.cut_next(after)
        assert st.read_schema("t.parquet").names == ["a", "b"]


@pytest.mark.slow
def test_credentials_in_the_uri_never_reach_logs_mlflow_or_summary(tmp_path, s3_server):
    from mlflow.tracking import MlflowClient

    from tests.test_pipeline import planted_overrides
    s3_server.make_bucket("secrets")
    uri = s3_server.uri("secrets", "runs", access_key="testing", secret_key="SUPERSECRET123")
    over = planted_overrides(tmp_path, n=30, T=4, extra=[f"store.uri='{uri}'", "masks.n_train=40", "masks.n_eval=6",
                                                        "cluster.num_cpus=1"])
    from tests.test_cli import user_command
    argv, env = user_command([f"exp.root={tmp_path}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *over],
                             tmp_path)
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SUPERSECRET123" not in proc.stdout + proc.stderr
    base = Store(s3_server.uri("secrets", "runs"))
    (name,) = base.list_dirs("")
    exp = Store(s3_server.uri("secrets", f"runs/{name}"))
    for rel in ("summary.json", "config.yaml"):
        assert b"SUPERSECRET123" not in exp.read_bytes(rel)
    assert json.loads(exp.read_bytes("summary.json"))["lds"]["datamodels"]["mean"] > 0.5
    hydra_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "runs") for f in fs]
    for path in hydra_files:
        if path.endswith((".yaml", ".log")):
            assert "SUPERSECRET123" not in open(path).read(), path
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("planted")
    for run in client.search_runs([experiment.experiment_id]):
        assert "SUPERSECRET123" not in json.dumps(run.data.params) + json.dumps(run.data.tags)
