import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.ledger import Ledger, LedgerError
from workers import bits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(ids, n=20, T=5, replica=0, mask_set="train", value=None):
    k = len(ids)
    rng = np.random.default_rng(list(ids))
    masks = rng.random((k, n)) < 0.5
    margins = rng.normal(size=(k, T)).astype(np.float32) if value is None else np.full((k, T), value, np.float32)
    return masks, {
        "mask_set": [mask_set] * k, "model_id": np.asarray(ids), "replica": [replica] * k,
        "seed": np.arange(k), "alpha": [0.5] * k, "mask": bits.pack(masks), "margins": margins,
        "train_acc": np.ones(k), "target_acc": np.ones(k), "loss": np.zeros(k), "seconds": np.ones(k),
        "code_version": ["t"] * k, "config_hash": ["h"] * k,
    }


def test_roundtrip_sorted_and_exact(tmp_path):
    led = Ledger(str(tmp_path / "ledger"))
    m1, r1 = rows([3, 1, 2])
    m2, r2 = rows([0, 4])
    led.write_unit("u1", r1)
    led.write_unit("u2", r2)
    d = led.load("train", n=20, n_targets=5)
    assert list(d.model_id) == [0, 1, 2, 3, 4]
    X = bits.unpack(d.packed, 20)
    order = {3: 0, 1: 1, 2: 2}
    for row, mid in enumerate(d.model_id):
        want = m1[order[mid]] if mid in order else m2[mid // 4]
        assert np.array_equal(X[row], want)
    assert d.margins.dtype == np.float32 and d.margins.shape == (5, 5)
    assert np.allclose(d.margins[1], r1["margins"][1])  # model 1


def test_duplicates_kept_once(tmp_path):
    led = Ledger(str(tmp_path))
    led.write_unit("u", rows([0, 1, 2])[1])
    led.write_unit("u", rows([1, 2, 3])[1])  # a retried/overlapping unit
    led.write_unit("v", rows([1], replica=1)[1])  # another replica is a distinct model
    d = led.load("train")
    assert list(zip(d.model_id, d.replica)) == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0)]
    assert led.count("train") == 5 and led.count("eval") == 0


def test_temp_files_ignored(tmp_path):
    led = Ledger(str(tmp_path))
    led.write_unit("u", rows([0, 1])[1])
    (tmp_path / ".tmp-deadbeef.parquet").write_bytes(b"PAR1 half a file")
    assert len(led.files()) == 1
    assert led.count("train") == 2 and not led.quarantined


def test_corrupt_file_quarantined_not_dropped(tmp_path, caplog):
    led = Ledger(str(tmp_path))
    led.write_unit("good", rows([0, 1])[1])
    bad = tmp_path / "bad-0000.parquet"
    good_bytes = open(led.files()[0], "rb").read()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated
    with caplog.at_level("ERROR"):
        assert led.count("train") == 2
    assert not bad.exists()
    assert (tmp_path / "_quarantine" / "bad-0000.parquet").exists()
    assert any("corrupt" in r.message for r in caplog.records)
    assert led.quarantined


def test_shape_mismatch_is_one_line_error(tmp_path):
    led = Ledger(str(tmp_path))
    led.write_unit("u", rows([0])[1])
    with pytest.raises(LedgerError, match="n=100"):
        led.load("train", n=100)
    with pytest.raises(LedgerError, match="T=5"):
        led.load("train", n_targets=7)
    with pytest.raises(LedgerError, match="stage=train"):
        led.load("eval")


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, {repo!r})
from orchestrator.ledger import Ledger
from workers import bits
k, n, T = 40000, 64, 1500
led = Ledger({path!r})
rng = np.random.default_rng(0)
r = {{"mask_set": ["train"] * k, "model_id": np.arange(k), "replica": [0] * k, "seed": np.arange(k),
     "alpha": [0.5] * k, "mask": bits.pack(rng.random((k, n)) < 0.5),
     "margins": rng.normal(size=(k, T)).astype(np.float32), "train_acc": np.ones(k),
     "target_acc": np.ones(k), "loss": np.zeros(k), "seconds": np.ones(k),
     "code_version": ["t"] * k, "config_hash": ["h"] * k}}
print("start", flush=True)
led.write_unit("big", r)
print("done", flush=True)
"""


def test_killed_writer_leaves_no_readable_partial_file(tmp_path):
    path = str(tmp_path / "ledger")
    Ledger(path).write_unit("first", rows([7], n=64, T=1500)[1])
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=REPO, path=path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    # kill it while it writes: poll until the temporary file appears, then SIGKILL
    deadline = time.time() + 60
    while time.time() < deadline and not any(f.startswith(".tmp-") for f in os.listdir(path)):
        time.sleep(0.005)
    assert any(f.startswith(".tmp-") for f in os.listdir(path)), "writer never started its temp file"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    led = Ledger(path)
    finished = led.files()
    assert len(finished) == 1  # only the first unit; the killed one left only a temp file
    for f in finished:
        pq.read_table(f)  # every listed file is complete
    assert led.count("train") == 1 and not led.quarantined
