"""What lets a stage skip work is as hard to fake as the work it skips (issue 25, items 1 and 6).

Checkpoints carry a digest of their bytes and the identity of what they are (the experiment's
config hash, the mask set, the model id and replica), verified on every read: a corrupt,
foreign or old checkpoint is retrained by the train stage (moved to checkpoints/_quarantine/),
and stops the baselines and embedding stages with one line naming it. The baselines' scores
record the digests of the checkpoints they came from. The record of checked ledger files is
signed with a key outside the store, and every reader still regenerates a few rows of every
recorded file at random: a forged record lets no other experiment's rows through.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import pickle
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

import workers.checkpoints as C
from orchestrator import pipeline
from orchestrator.storage import masks as M
from orchestrator.storage.ledger import Identity, Ledger
from orchestrator.storage.store import DIGESTS_KEY, Layout, Store
from tests.conftest import compose
from tests.test_pipeline import PlantedTask, planted_overrides, trained

CKPT_LOG = "orchestrator.storage.checkpoints"


@pytest.fixture(autouse=True)
def own_key(tmp_path_factory, monkeypatch):
    """The key that signs the records of checked files: one for the module, outside every store."""
    monkeypatch.setenv("DATAMODELS_KEY_FILE", str(tmp_path_factory.getbasetemp() / "key" / "ledger.key"))


def small_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def overwrite(blob: bytes, rng, start: int = 0) -> bytes:
    """`blob` with 8 random bytes written at a random offset (at or after `start`), at least one changed."""
    data = bytearray(blob)
    at = int(rng.integers(start, len(data) - 8))
    new = bytes(data[at:at + 8])
    while new == bytes(data[at:at + 8]):
        new = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    data[at:at + 8] = new
    return bytes(data)


def ident_of(config_hash: str, i: int) -> dict:
    return {"config_hash": config_hash, "mask_set": "train", "model_id": i, "replica": 0}


# --------------------------------------------------------------------------- the file format
def test_random_overwrites_of_a_checkpoint_never_load_changed_weights():
    """400 seeded 8-byte overwrites anywhere in a checkpoint: every one is refused before it is
    unpickled; none loads weights other than those written."""
    state = small_state()
    blob = C.to_bytes(state)
    rng = np.random.default_rng(25)
    changed, refused = 0, []
    for _ in range(400):
        try:
            got = C.from_bytes(overwrite(blob, rng))
        except Exception as err:  # noqa: BLE001 - any refusal; its kind is checked below
            refused.append(err)
            continue
        changed += not same(got, state)
    assert changed == 0, f"{changed} of 400 overwrites loaded changed weights"
    assert len(refused) == 400 and all(isinstance(e, C.CheckpointError) for e in refused)
    assert all("\n" not in str(e) for e in refused)


def test_identity_old_files_and_malicious_payloads_are_refused(tmp_path, monkeypatch):
    state = small_state()
    blob = C.to_bytes(state, C.checkpoint_identity("hA", "train", 3, 0))
    assert same(C.from_bytes(blob, ident_of("hA", 3)), state)
    assert C.verify(blob, ident_of("hA", 3)) == C.verify(C.to_bytes(state, ident_of("hA", 3)))
    with pytest.raises(C.CheckpointError, match=r"something else \(config_hash='hA'; this one must have "
                                                r"config_hash='hB'\)"):
        C.from_bytes(blob, ident_of("hB", 3))                   # another experiment's model 3
    with pytest.raises(C.CheckpointError, match="model_id=3.*model_id=4"):
        C.from_bytes(blob, ident_of("hA", 4))                   # this experiment's model 3 under 4's name
    # rewriting the identity in the header (and leaving the digest) is corruption too
    forged = blob.replace(b'"config_hash": "hA"', b'"config_hash": "hB"')
    assert forged != blob
    with pytest.raises(C.CheckpointError, match="do not match its digest"):
        C.from_bytes(forged, ident_of("hB", 3))
    # a checkpoint written before checkpoints had a digest: refused, as if missing
    old = io.BytesIO()
    torch.save(state, old)
    with pytest.raises(C.CheckpointError, match="no digest"):
        C.from_bytes(old.getvalue())
    # a payload that is a pickle calling os.system, under a valid digest: weights_only refuses it
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    monkeypatch.setattr(torch, "save", lambda obj, f: pickle.dump(Evil(), f, protocol=2))
    evil = C.to_bytes({})
    monkeypatch.undo()
    with pytest.raises(C.CheckpointError, match="weights do not load"):
        C.from_bytes(evil)
    assert not marker.exists()


def test_train_stage_retrains_every_checkpoint_that_fails(tmp_path, caplog):
    """missing_checkpoints verifies each checkpoint: corrupt, another experiment's, another
    model's, written without a digest, truncated or absent all count as missing; the files are
    moved to checkpoints/_quarantine/ (one line each, naming the file), nothing is deleted."""
    from orchestrator.storage.checkpoints import missing_checkpoints
    store = Store(str(tmp_path / "exp"))
    rng = np.random.default_rng(6)
    states = [small_state(i) for i in range(6)]
    good = [C.to_bytes(s, ident_of("hA", i)) for i, s in enumerate(states)]
    old = io.BytesIO()
    torch.save(states[3], old)
    files = [overwrite(good[0], rng), C.to_bytes(states[1], ident_of("hB", 1)), good[3], old.getvalue(),
             good[4][:len(good[4]) // 2], good[5]]
    for i, blob in enumerate(files):
        store.write_bytes(Layout.checkpoint("train", i, 0), blob)
    caplog.set_level(logging.ERROR, CKPT_LOG)
    assert missing_checkpoints(store, 7, "hA") == [0, 1, 2, 3, 4, 6]
    assert sorted(os.listdir(tmp_path / "exp" / "checkpoints")) == ["_quarantine", "train-0000005-r0.pt"]
    kept = sorted(os.listdir(tmp_path / "exp" / "checkpoints" / "_quarantine"))
    assert [k[:len("train-0000000")] for k in kept] == [f"train-000000{i}" for i in range(5)]
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 5 and all("\n" not in ln for ln in lines)
    for i, why in enumerate(["digest", "config_hash='hB'", "model_id=2", "no digest", "truncated"]):
        line = [ln for ln in lines if f"train-000000{i}-r0.pt quarantined" in ln]
        assert len(line) == 1 and why in line[0], (i, lines)
    # many seeded overwrites of a good checkpoint: each is found, the good ones never are
    for _ in range(60):
        store.write_bytes(Layout.checkpoint("train", 5, 0), overwrite(good[5], rng))
        store.write_bytes(Layout.checkpoint("train", 0, 0), good[0])
        assert missing_checkpoints(store, 6, "hA") == [1, 2, 3, 4, 5]
    assert missing_checkpoints(store, 1, "hA") == []


def test_scores_record_their_checkpoints(tmp_path, caplog):
    """A scores file counts as done only for the checkpoints it records; one written before
    files recorded them is recomputed (one warning naming it)."""
    from orchestrator.storage import scores as B
    store = Store(str(tmp_path / "exp"))
    S = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    store.write_table("scores/a.parquet", B.scores_table(S, {"method": "trak", "checkpoint_digests": ["d0", "d1"]}))
    store.write_table("scores/old.parquet", B.scores_table(S, {"method": "trak"}))
    assert B.scores_ok(store, "scores/a.parquet", 30, 4, ["d0", "d1"])["checkpoint_digests"] == ["d0", "d1"]
    assert B.scores_ok(store, "scores/a.parquet", 30, 4, ["d0", "dX"]) is None
    assert B.scores_ok(store, "scores/old.parquet", 30, 4, ["d0", "d1"]) is None
    assert "scores/old.parquet was computed from checkpoints it does not record" in caplog.text
    assert "scores/a.parquet was computed from other checkpoints" in caplog.text


# --------------------------------------------------------------------------- signed records of checks
IDENT = Identity(config_hash="h0", alpha=0.5, seed=7, n=20, n_targets=5)


def unit_rows(ids, seed: int, config_hash: str, n: int = 20, T: int = 5, alpha: float = 0.5,
              margins=None, code_version: str = "t") -> dict:
    """Rows as the train stage writes them, for the experiment of `seed` (its masks and model
    seeds), stamped with `config_hash` (another experiment's rows with the hash rewritten)."""
    ids = np.asarray(ids, dtype=np.int64)
    k = len(ids)
    masks = M.make_masks(seed, "train", ids, n, alpha)
    if margins is None:
        margins = np.random.default_rng(list(ids)).normal(size=(k, T)).astype(np.float32)
    from workers import bits
    return {"mask_set": ["train"] * k, "model_id": ids, "replica": np.zeros(k, np.int32),
            "seed": M.MaskSets().seeds(seed, "train", ids, np.zeros(k, np.int32)), "alpha": [alpha] * k,
            "mask": bits.pack(masks), "margins": margins, "train_acc": np.ones(k), "target_acc": np.ones(k),
            "loss": np.zeros(k), "seconds": np.ones(k), "code_version": [code_version] * k,
            "config_hash": [config_hash] * k}


def footer_digest(path) -> str:
    """What anyone who can read a ledger file can compute of it: its footer's column digests."""
    import pyarrow.parquet as pq
    digests = json.loads(pq.read_schema(path).metadata[DIGESTS_KEY])
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def forge_records(root, ident: Identity, names: list[str], sign_with: bytes | None = None) -> None:
    """What a writer of the store can do to vouch for `names`: add them to every record of
    checked files there (re-signed with `sign_with`, a key it has), and write a record in the
    unsigned format of earlier versions."""
    led = os.path.join(root, "ledger")
    checked = os.path.join(led, "_checked")
    os.makedirs(checked, exist_ok=True)
    about = {k: v for k, v in asdict(ident).items() if k != "n_self" or v}    # the record's scope format
    for rec in os.listdir(checked):
        path = os.path.join(checked, rec)
        doc = json.load(open(path))
        if isinstance(doc["files"], list):
            doc["files"] += names
        else:
            doc["files"].update({n: footer_digest(os.path.join(led, n)) for n in names})
            scope = json.loads(json.dumps({**about, **M.MaskSets().describe()}, default=str))
            body = json.dumps({"format": 2, "key_id": doc["key_id"], "scope": scope, "files": doc["files"]},
                              sort_keys=True, separators=(",", ":"))
            doc["mac"] = hmac.new(sign_with or os.urandom(32), body.encode(), hashlib.sha256).hexdigest()
        with open(path, "w") as f:
            json.dump(doc, f)
    key = json.dumps({**about, **M.MaskSets().describe()}, sort_keys=True, default=str)
    unsigned = os.path.join(checked, hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    everything = sorted(n for n in os.listdir(led) if n.endswith(".parquet"))
    with open(unsigned, "w") as f:
        json.dump({"files": everything}, f)


def test_forged_record_lets_no_foreign_rows_through(tmp_path, caplog):
    """Another experiment's rows (other seed), config hash rewritten, digests valid, and named in
    a forged record of checked files: quarantined, whether the record is unsigned, signed with
    another key, or signed with this machine's key (a leaked key: the spot check finds it)."""
    led = Ledger(Store(str(tmp_path)), IDENT)
    for u in range(3):
        led.write_unit(f"train-{u:06d}", unit_rows(np.arange(4 * u, 4 * u + 4), IDENT.seed, "h0"))
    want = led.index().keys()
    assert len(want) == 12 and os.listdir(tmp_path / "ledger" / "_checked")

    for attempt in ("another key", "this machine's key"):
        foreign = Ledger(Store(str(tmp_path)), IDENT).write_unit(
            "train-000003", unit_rows(np.arange(12, 20), IDENT.seed + 1, "h0", code_version=attempt))
        name = foreign.rsplit("/", 1)[1]
        key = None
        if attempt == "this machine's key":
            from orchestrator.storage.ledger import key_path
            key = bytes.fromhex(open(key_path()).read().strip())
        forge_records(tmp_path, IDENT, [name], sign_with=key)
        caplog.clear()
        reader = Ledger(Store(str(tmp_path)), IDENT)
        got = reader.index().keys()
        assert got == want, attempt                          # not one foreign row
        assert [q["file"] for q in reader.quarantined] == [name], attempt
        assert "that exp.seed does not give" in reader.quarantined[0]["reason"]     # its model seeds
        assert (tmp_path / "ledger" / "_quarantine" / name).exists()
        if attempt == "another key":
            assert "not authentic" in caplog.text
        else:
            assert "fails its spot check; the record is dropped" in caplog.text
        # the record written after the check vouches for this experiment's files only
        assert Ledger(Store(str(tmp_path)), IDENT).index().keys() == want


# --------------------------------------------------------------------------- through the pipeline
def tiny_overrides(extra=()) -> list[str]:
    return ["experiment=tiny", "masks.n_train=40", "masks.n_eval=10", "baselines.methods=[trak]",
            "baselines.budget_checkpoints=[]", "fit.prefixes=[]", "exp.name=ckpt", *extra]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, ray_local):
    """Experiment A (train, then baselines: 3 checkpoints and TRAK's scores) and experiment B
    (another exp.seed: another config hash, its own checkpoints), each run once: their roots."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATAMODELS_KEY_FILE", str(tmp_path_factory.getbasetemp() / "key" / "ledger.key"))
        a, b = tmp_path_factory.mktemp("A"), tmp_path_factory.mktemp("B")
        sa = pipeline.run(compose(tiny_overrides(["stage=train"]), a))
        pipeline.run(compose(tiny_overrides(["stage=baselines"]), a))
        sb = pipeline.run(compose(tiny_overrides(["stage=train", "exp.seed=1"]), b))
    return {"A": (a, sa["experiment_dir"]), "B": (b, sb["experiment_dir"])}


def copy_of(run, tmp_path) -> str:
    """A copy of a finished experiment under tmp_path (the same experiment: the same hash)."""
    root, where = run
    shutil.copytree(os.path.join(root, "runs"), tmp_path / "runs")
    return str(tmp_path / "runs" / os.path.relpath(where, os.path.join(root, "runs")))


def ckpt(where, i) -> str:
    return os.path.join(where, Layout.checkpoint("train", i, 0))


def scores(where) -> tuple[np.ndarray, dict]:
    from orchestrator.storage import scores as B
    rel = [e.rel for e in Store(where).list("scores", ".parquet")]
    assert len(rel) == 1
    return B.read_scores(Store(where), rel[0])


@pytest.mark.slow
def test_corrupt_checkpoints_are_retrained_never_read(tmp_path, tiny_runs):
    from orchestrator.analyses import common as A
    from orchestrator.analyses import embedding as A_embedding
    from orchestrator.runtime.plan import validate
    from orchestrator.storage.scores import BaselinesError
    where = copy_of(tiny_runs["A"], tmp_path)
    originals = [open(ckpt(where, i), "rb").read() for i in range(3)]
    clean, clean_meta = scores(where)
    rng = np.random.default_rng(2025)
    for i in (0, 2):
        with open(ckpt(where, i), "wb") as f:
            f.write(overwrite(originals[i], rng))

    # the baselines and the embedding meet the bad checkpoint: one line naming it and the fix
    with pytest.raises(BaselinesError) as err:
        pipeline.run(compose(tiny_overrides(["stage=baselines"]), tmp_path))
    line = str(err.value)
    assert "\n" not in line and ckpt(where, 0) in line and "run stage=train to retrain it" in line
    assert "baselines.params" not in line
    plan = validate(compose(tiny_overrides(), tmp_path))
    with pytest.raises(A.AnalysisError) as err2:
        A_embedding.last_layer_features(plan, 2, "cpu")
    assert "\n" not in str(err2.value) and ckpt(where, 2) in str(err2.value)
    assert "run stage=train to retrain it" in str(err2.value)

    # the train stage retrains exactly the two, which come back as they were
    s = pipeline.run(compose(tiny_overrides(["stage=train"]), tmp_path))
    assert s["train"]["models_trained"] == 2
    assert len(os.listdir(os.path.join(where, "checkpoints", "_quarantine"))) == 2
    assert [open(ckpt(where, i), "rb").read() for i in range(3)] == originals
    assert A_embedding.last_layer_features(plan, 2, "cpu").shape == (plan.n_targets, 32)    # the MLP's hidden layer
    s = pipeline.run(compose(tiny_overrides(["stage=baselines"]), tmp_path))
    assert s["baselines"]["methods"]["trak"]["cached"] is True
    got, meta = scores(where)
    assert np.array_equal(got, clean) and meta == clean_meta

    # a checkpoint replaced by a valid one of other weights (a retrain that came out otherwise):
    # the scores computed from the old one are recomputed from it
    state = C.from_bytes(originals[1])
    state = {k: v + 0.01 for k, v in state.items()}
    with open(ckpt(where, 1), "wb") as f:
        f.write(C.to_bytes(state, C.checkpoint_identity(plan.identity.config_hash, "train", 1, 0)))
    # stage=evaluate alone does not score TRAK from the old checkpoint's scores: one line, the fix
    pipeline.run(compose(tiny_overrides(["stage=fit"]), tmp_path))
    with pytest.raises(BaselinesError) as err3:
        pipeline.run(compose(tiny_overrides(["stage=evaluate"]), tmp_path))
    assert "another checkpoint 1" in str(err3.value) and "run stage=baselines" in str(err3.value)
    s = pipeline.run(compose(tiny_overrides(["stage=baselines"]), tmp_path))
    assert s["baselines"]["methods"]["trak"]["cached"] is False
    assert "trak" in pipeline.run(compose(tiny_overrides(["stage=evaluate"]), tmp_path))["lds"]
    got, meta = scores(where)
    assert not np.array_equal(got, clean)
    assert meta["checkpoint_digests"][1] == C.verify(open(ckpt(where, 1), "rb").read())
    assert meta["checkpoint_digests"][::2] == clean_meta["checkpoint_digests"][::2]


@pytest.mark.slow
def test_a_checkpoint_of_another_experiment_is_refused(tmp_path, tiny_runs):
    from orchestrator.storage.scores import BaselinesError
    where = copy_of(tiny_runs["A"], tmp_path)
    original = open(ckpt(where, 0), "rb").read()
    clean, _ = scores(where)
    shutil.copyfile(ckpt(tiny_runs["B"][1], 0), ckpt(where, 0))      # B's model 0, under A's name
    with pytest.raises(BaselinesError) as err:
        pipeline.run(compose(tiny_overrides(["stage=baselines"]), tmp_path))
    assert "\n" not in str(err.value) and ckpt(where, 0) in str(err.value) and "config_hash" in str(err.value)
    s = pipeline.run(compose(tiny_overrides(["stage=train"]), tmp_path))
    assert s["train"]["models_trained"] == 1
    config_hash = os.path.basename(where).rsplit("-", 1)[1]
    new = C.from_bytes(open(ckpt(where, 0), "rb").read(), C.checkpoint_identity(config_hash, "train", 0, 0))
    old = C.from_bytes(original)
    # model 0 trained alone, not beside 39 others: the same model up to float rounding
    assert all(torch.allclose(new[k], old[k], rtol=1e-4, atol=1e-5) for k in old)
    s = pipeline.run(compose(tiny_overrides(["stage=baselines"]), tmp_path))
    got, meta = scores(where)
    assert meta["checkpoint_digests"][0] == C.verify(open(ckpt(where, 0), "rb").read())
    assert np.allclose(got, clean, rtol=1e-3, atol=1e-3 * np.abs(clean).max())


@pytest.mark.slow
def test_forged_record_in_the_pipeline_fits_no_foreign_rows(tmp_path, ray_local):
    """Another experiment's 50 rows (another seed, another task) under this experiment's config
    hash, valid digests, named in forged records of checked files: the next run quarantines
    them, trains those 50 models for real, and fits and scores exactly what a clean run does."""
    from orchestrator.runtime.plan import validate
    ref_root = tmp_path / "ref"
    ref = pipeline.run(compose(planted_overrides(ref_root, extra=["masks.n_train=450"]), ref_root))
    over = planted_overrides(tmp_path)
    s = pipeline.run(compose(over + ["stage=train"], tmp_path))
    where = s["experiment_dir"]
    ident = validate(compose(over, tmp_path)).identity
    ids = np.arange(400, 450)
    other = ident.seed + 1
    masks = M.make_masks(other, "train", ids, ident.n, ident.alpha)
    res = PlantedTask(60, 8, nonzeros=12).train(masks, M.MaskSets().seeds(other, "train", ids, np.zeros(50)))
    rows = unit_rows(ids, other, ident.config_hash, n=ident.n, T=ident.n_targets, alpha=ident.alpha,
                     margins=res.margins)
    name = Ledger(Store(where), ident).write_unit("train-000007", rows).rsplit("/", 1)[1]
    forge_records(where, ident, [name])
    before = trained(tmp_path / "count")

    s2 = pipeline.run(compose(over + ["masks.n_train=450"], tmp_path))
    assert [q["file"] for q in s2.get("quarantined", [])] == [name]
    assert s2["train"]["models_trained"] == 50 and trained(tmp_path / "count") == before + 50
    assert s2["models"]["train"] == 450
    assert s2["lds"]["datamodels"]["mean"] == pytest.approx(ref["lds"]["datamodels"]["mean"], abs=1e-9)
