"""The ledger reads only what it can verify: corruption, foreign units, other schemas and a
killed writer are quarantined or ignored, never read as rows."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.storage import masks as M
from orchestrator.storage.ledger import FAILED_NONFINITE, Identity, Ledger, LedgerError, unit_table
from orchestrator.storage.store import Store
from workers import bits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDENT = Identity(config_hash="h0", alpha=0.5, seed=7, n=20, n_targets=5)


def rows(ids, ident=IDENT, replica=0, mask_set="train", margins=None, seed_offset=0):
    """Rows as the train stage writes them: masks and seeds regenerated from the identity."""
    ids = np.asarray(ids, dtype=np.int64)
    k = len(ids)
    masks = M.make_masks(ident.seed, mask_set, ids, ident.n, ident.alpha)
    rng = np.random.default_rng(list(ids) + [replica, seed_offset])
    if margins is None:
        margins = rng.normal(size=(k, ident.n_targets)).astype(np.float32)
    return masks, margins, {
        "mask_set": [mask_set] * k, "model_id": ids, "replica": [replica] * k,
        "seed": [M.model_seed(ident.seed, mask_set, int(i), replica) for i in ids],
        "alpha": [ident.alpha] * k, "mask": bits.pack(masks), "margins": margins,
        "train_acc": np.ones(k), "target_acc": np.ones(k), "loss": np.zeros(k), "seconds": np.ones(k),
        "code_version": ["t"] * k, "config_hash": [ident.config_hash] * k,
    }


def ledger(path, ident=IDENT) -> Ledger:
    return Ledger(Store(str(path)), ident)


def test_roundtrip_sorted_and_exact(tmp_path):
    led = ledger(tmp_path)
    m1, y1, r1 = rows([3, 1, 2])
    m2, y2, r2 = rows([0, 4])
    led.write_unit("u1", r1)
    led.write_unit("u2", r2)
    d = ledger(tmp_path).load("train", n=20, n_targets=5)
    assert list(d.model_id) == [0, 1, 2, 3, 4]
    X = bits.unpack(d.packed, 20)
    truth = {3: (m1[0], y1[0]), 1: (m1[1], y1[1]), 2: (m1[2], y1[2]), 0: (m2[0], y2[0]), 4: (m2[1], y2[1])}
    for row, mid in enumerate(d.model_id):
        assert np.array_equal(X[row], truth[mid][0])
        assert np.array_equal(d.margins[row], truth[mid][1])
    assert d.margins.dtype == np.float32 and d.margins.shape == (5, 5)


def test_same_content_is_the_same_file(tmp_path):
    led = ledger(tmp_path)
    a = led.write_unit("u", rows([0, 1])[2])
    b = led.write_unit("u", rows([0, 1])[2])
    assert a == b and len(led.files()) == 1


def test_duplicates_resolved_by_content_the_same_way_everywhere(tmp_path):
    led = ledger(tmp_path)
    led.write_unit("u", rows([0, 1, 2])[2])
    led.write_unit("u", rows([1, 2, 3], seed_offset=1)[2])   # a retried unit with other numbers
    led.write_unit("v", rows([1], replica=1)[2])              # another replica is a distinct model
    index = led.index()
    assert index.duplicates == 2
    d = led.load("train", index=index)
    assert list(zip(d.model_id, d.replica)) == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0)]
    # the copy kept is the one in the file with the smaller content digest, whatever the names
    chosen = {os.path.basename(index.files[f]) for f in index.file[[1, 3]]}
    digests = sorted(f.rsplit("-", 1)[1] for f in os.listdir(tmp_path / "ledger") if f.startswith("u-"))
    assert {c.rsplit("-", 1)[1] for c in chosen} == {digests[0]}
    again = ledger(tmp_path).load("train")
    assert np.array_equal(again.margins, d.margins)


def test_temp_files_ignored(tmp_path):
    led = ledger(tmp_path)
    led.write_unit("u", rows([0, 1])[2])
    (tmp_path / "ledger" / ".tmp-deadbeef-u.parquet").write_bytes(b"PAR1 half a file")
    assert len(led.files()) == 1
    assert led.count("train") == 2 and not led.quarantined


def test_truncated_file_quarantined_not_dropped(tmp_path, caplog):
    led = ledger(tmp_path)
    led.write_unit("good", rows([0, 1])[2])
    rel = led.write_unit("bad", rows([2, 3])[2])
    path = tmp_path / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("ERROR"):
        assert led.keys("train") == {("train", 0, 0), ("train", 1, 0)}
    assert not path.exists()
    assert (tmp_path / "ledger" / "_quarantine" / path.name).exists()
    assert any("quarantined" in r.message for r in caplog.records)
    assert led.quarantined[0]["file"] == path.name


def test_shape_mismatch_is_one_line_error(tmp_path):
    led = Ledger(Store(str(tmp_path)))
    led.write_unit("u", rows([0])[2])
    with pytest.raises(LedgerError, match="n=100"):
        led.load("train", n=100)
    with pytest.raises(LedgerError, match="T=5"):
        led.load("train", n_targets=7)
    with pytest.raises(LedgerError, match="stage=train"):
        led.load("eval")


def _write_raw(path, table):
    import json

    from orchestrator.storage.store import DIGESTS_KEY, table_digests
    meta = {DIGESTS_KEY: json.dumps(table_digests(table)).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_other_schemas_and_foreign_units_are_quarantined(tmp_path):
    led = ledger(tmp_path)
    led.write_unit("good", rows([0, 1])[2])
    d = tmp_path / "ledger"
    # another schema: list<double> margins and no mask column (digests valid, so only the schema check can catch it)
    _write_raw(d / "schema-1111.parquet", pa.table({
        "mask_set": ["train"], "model_id": pa.array([5], pa.int64()), "replica": pa.array([0], pa.int32()),
        "margins_0": pa.array([[1.0] * 5], pa.list_(pa.float64()))}))
    # 10 margins per row where the experiment has T=5
    wide = Identity("h0", 0.5, 7, 20, 10)
    Ledger(Store(str(tmp_path)), wide).write_unit("wide", rows([6], ident=wide)[2])
    # a unit of another experiment (alpha 0.3, its own config hash)
    foreign = Identity("h1", 0.3, 7, 20, 5)
    Ledger(Store(str(tmp_path)), foreign).write_unit("foreign", rows([7], ident=foreign)[2])
    # right hash and alpha, but masks not from this seed (a tampered or buggy writer)
    _, _, r = rows([8])
    r["mask"] = bits.pack(M.make_masks(99, "train", [8], 20, 0.5))
    led.write_unit("tampered", r)
    # right everything but the model seed
    _, _, r = rows([9])
    r["seed"] = [12345]
    led.write_unit("seed", r)
    reader = ledger(tmp_path)
    index = reader.index()
    assert index.keys("train") == {("train", 0, 0), ("train", 1, 0)}
    assert len(os.listdir(d / "_quarantine")) == 5
    reasons = {r["file"].split("-")[0]: r["reason"] for r in reader.quarantined}
    assert set(reasons) == {"schema", "wide", "foreign", "tampered", "seed"}, reasons
    assert "mask" in reasons["schema"]
    assert "margins_0" in reasons["wide"]
    assert "another experiment" in reasons["foreign"]
    assert "masks" in reasons["tampered"] and "seed" in reasons["seed"]
    assert not ledger(tmp_path).index().duplicates and not os.listdir(d / "_quarantine") == []


def test_nonfinite_margins_are_failed_models_never_loaded(tmp_path):
    led = ledger(tmp_path)
    y = np.ones((3, 5), np.float32)
    y[1, 2] = np.nan
    led.write_unit("u", rows([0, 1, 2], margins=y)[2])
    index = led.index()
    assert index.count("train") == 2
    assert index.failed_models() == [{"mask_set": "train", "model_id": 1, "replica": 0, "reason": FAILED_NONFINITE}]
    assert ("train", 1, 0) in index.keys("train")      # present: not retrained (it would diverge again)
    assert list(led.load("train").model_id) == [0, 2]


def test_random_overwrites_never_read_as_rows(tmp_path):
    """200 random 8-byte overwrites of unit files: every row read is a true row."""
    pristine = tmp_path / "pristine"
    led = ledger(pristine)
    truth = {}
    for u, ids in enumerate(([0, 1, 2, 3], [4, 5, 6], [7, 8])):
        masks, y, r = rows(ids)
        led.write_unit(f"train-{u:06d}", r)
        for i, mid in enumerate(ids):
            truth[mid] = (bits.pack(masks[i:i + 1])[0], y[i])
    files = sorted(os.listdir(pristine / "ledger"))
    rng = np.random.default_rng(0)
    wrong = quarantined = intact = 0
    for trial in range(200):
        work = tmp_path / f"t{trial}"
        shutil.copytree(pristine, work)
        victim = work / "ledger" / files[rng.integers(len(files))]
        data = bytearray(victim.read_bytes())
        at = int(rng.integers(0, len(data) - 8))
        data[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        victim.write_bytes(bytes(data))
        reader = ledger(work)
        try:
            d = reader.load("train", n=20, n_targets=5)
        except LedgerError:
            d = None
        if reader.quarantined:
            quarantined += 1
        else:
            intact += 1
        if d is not None:
            for row, mid in enumerate(d.model_id):
                if not (np.array_equal(d.packed[row], truth[mid][0]) and np.array_equal(d.margins[row], truth[mid][1])):
                    wrong += 1
        shutil.rmtree(work)
    print(f"random overwrites: 200 trials, {quarantined} quarantined, {intact} read intact, {wrong} wrong rows")
    assert wrong == 0
    assert quarantined > 150


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, {repo!r})
from orchestrator.storage.ledger import Ledger
from orchestrator.storage.store import Store
from workers import bits
k, n, T = 40000, 64, 1500
led = Ledger(Store({path!r}))
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
    path = str(tmp_path)
    one = Identity("h", 0.5, 0, 64, 1500)
    Ledger(Store(path)).write_unit("first", rows([7], ident=one)[2])
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=REPO, path=path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    # kill it while it writes: poll until the temporary file appears, then SIGKILL
    ldir = os.path.join(path, "ledger")
    deadline = time.time() + 120
    while time.time() < deadline and not any(f.startswith(".tmp-") for f in os.listdir(ldir)):
        time.sleep(0.002)
    assert any(f.startswith(".tmp-") for f in os.listdir(ldir)), "writer never started its temp file"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    led = Ledger(Store(path))
    assert len(led.files()) == 1  # only the first unit; the killed one left only a temp file
    assert led.count("train") == 1 and not led.quarantined


def test_masks_checked_once_per_file_content_and_experiment(tmp_path, monkeypatch, caplog):
    """Ledger.index regenerates a file's masks in full once: a later reader (a later run) finds
    the file in the signed record of checked files and regenerates only SPOT_ROWS rows of it,
    picked at random. A file rewritten under a recorded name, a record that does not parse,
    another experiment's reader and a record that cannot be written all fall back to the full
    check. The key that signs the record is created 0600 outside the store."""
    from orchestrator.storage.ledger import SPOT_ROWS
    key = tmp_path / "home" / "ledger.key"
    monkeypatch.setenv("DATAMODELS_KEY_FILE", str(key))
    calls = []
    real = M.make_masks
    monkeypatch.setattr(M, "make_masks", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    led = ledger(tmp_path)
    rel_a = led.write_unit("a", rows([0, 1, 2, 3])[2])
    led.write_unit("b", rows([4, 5, 6, 7])[2])
    calls.clear()
    want = led.index()
    assert [len(c) for c in calls] == [4, 4] and os.listdir(tmp_path / "ledger" / "_checked")
    assert key.exists() and key.stat().st_mode & 0o777 == 0o600
    calls.clear()
    again = ledger(tmp_path).index()                          # the next run: a spot check of each file
    assert [len(c) for c in calls] == [SPOT_ROWS, SPOT_ROWS]
    assert again.keys() == want.keys() and np.array_equal(again.file, want.file)

    # a file rewritten under its recorded name, with masks of another seed and valid digests
    _, _, r = rows([0, 1, 2, 3])
    r["mask"] = bits.pack(real(99, "train", [0, 1, 2, 3], 20, 0.5))
    _write_raw(tmp_path / rel_a, unit_table("a", r, 5))
    calls.clear()
    reader = ledger(tmp_path)
    assert reader.index().keys("train") == {("train", i, 0) for i in (4, 5, 6, 7)}
    assert [q["reason"] for q in reader.quarantined] == ["masks that exp.seed and masks.alpha do not give"]

    # a record that does not parse: a warning, every file checked in full, the record written again
    record = next((tmp_path / "ledger" / "_checked").iterdir())
    record.write_bytes(b"\x00garbage")
    calls.clear()
    caplog.clear()
    assert ledger(tmp_path).index().keys() == {("train", i, 0) for i in (4, 5, 6, 7)}
    assert [len(c) for c in calls] == [4] and "unreadable" in caplog.text
    calls.clear()
    ledger(tmp_path).index()
    assert [len(c) for c in calls] == [SPOT_ROWS]

    # a record that cannot be written: one warning naming its path, the index unchanged
    shutil.rmtree(tmp_path / "ledger" / "_checked")
    (tmp_path / "ledger" / "_checked").write_text("not a directory")
    caplog.clear()
    assert ledger(tmp_path).index().keys() == {("train", i, 0) for i in (4, 5, 6, 7)}
    assert "could not record the checked files" in caplog.text and "_checked" in caplog.text
    os.unlink(tmp_path / "ledger" / "_checked")
    ledger(tmp_path).index()

    # another experiment's reader (another seed) is not covered by this record
    other = Identity("h0", 0.5, 8, 20, 5)
    reader = Ledger(Store(str(tmp_path)), other)
    assert reader.index().keys() == set()
    assert ["seed" in q["reason"] for q in reader.quarantined] == [True]
